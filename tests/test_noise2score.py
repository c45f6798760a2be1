import math

import pytest
import torch

from cleanprior.learning.noise2score import (
    Noise2Score,
    ScoreConfig,
    ardae_loss,
    train_score,
    tweedie,
)
from cleanprior.nn import UNet, build_network
from cleanprior.operators.noise import GammaNoise, GaussianNoise, PoissonGaussianNoise, PoissonNoise
from cleanprior.reference import GaussianMixture
from cleanprior.runs.checkpoint import load_checkpoint

F64 = torch.float64


def grad_of(log_density, y):
    """The score of a log-density written in torch, by autograd."""
    y = y.detach().requires_grad_(True)
    (score,) = torch.autograd.grad(log_density(y).sum(), y)
    return score


def test_gaussian_tweedie_is_the_posterior_mean_of_a_gaussian_prior():
    """x ~ N(m, s^2 I), y = x + sigma n: E[x | y] = (s^2 y + sigma^2 m) / (s^2 + sigma^2)."""
    g = torch.Generator().manual_seed(0)
    m, s = 0.4, 0.7
    sigma = torch.tensor([0.1, 0.5, 1.0, 2.0], dtype=F64)  # one level per observation
    y = m + torch.randn(4, 3, generator=g, dtype=F64) * 2
    v = (s**2 + sigma**2)[:, None]
    score = grad_of(lambda t: -0.5 * (t - m) ** 2 / v, y)
    expected = (s**2 * y + sigma[:, None] ** 2 * m) / v
    assert torch.allclose(tweedie(y, score, "gaussian", std=sigma), expected, atol=1e-12)


def test_gaussian_tweedie_is_the_posterior_mean_of_a_mixture_prior():
    """For any prior: the mixture's noisy marginal is the mixture at level sigma, its E[x|y] the denoiser."""
    means = torch.tensor([[-1.0, 0.5], [1.0, -0.5], [0.0, 1.5]], dtype=F64)
    prior = GaussianMixture.isotropic(means, torch.tensor([0.2, 0.4, 0.3], dtype=F64))
    sigma = 0.6
    y = prior.sample(32, torch.Generator().manual_seed(1)) + sigma * torch.randn(
        32, 2, generator=torch.Generator().manual_seed(2), dtype=F64
    )
    score = grad_of(lambda t: prior.log_prob(t, sigma), y)
    assert torch.allclose(
        tweedie(y, score, GaussianNoise(sigma)), prior.denoiser(y, sigma), atol=1e-12
    )


def negative_binomial_log_pmf(y, a, b, gain):
    """log p(y) of y = gain * k, k ~ Poisson(x / gain), x ~ Gamma(a, rate b), continued to real k by Gamma functions."""
    k = y / gain
    q = b * gain  # the rate of lambda = x / gain
    return (
        torch.lgamma(k + a)
        - torch.lgamma(k + 1)
        - math.lgamma(a)
        + a * math.log(q / (q + 1))
        - k * math.log(q + 1)
    )


def test_negative_binomial_marginal_matches_quadrature():
    """The closed-form marginal the Poisson tests differentiate, against integrating the Poisson likelihood."""
    a, b, gain = 3.0, 2.0, 0.5
    lam = torch.linspace(1e-6, 80, 400_001, dtype=F64)
    q = b * gain
    log_prior = a * math.log(q) - math.lgamma(a) + (a - 1) * torch.log(lam) - q * lam
    for k in (0, 1, 4, 11):
        integrand = torch.exp(log_prior + k * torch.log(lam) - lam - math.lgamma(k + 1))
        p = torch.trapezoid(integrand, lam)
        closed = negative_binomial_log_pmf(torch.tensor(gain * k, dtype=F64), a, b, gain).exp()
        assert p.item() == pytest.approx(closed.item(), rel=1e-7)


@pytest.mark.parametrize("gain", [1.0, 0.25])
def test_poisson_tweedie_with_digamma_is_exact_for_a_gamma_prior(gain):
    """With the score of the Gamma-continued marginal, exp E[log x | y] = gain e^{psi(a + k)} / (b gain + 1)."""
    a, b = 3.0, 2.0
    k = torch.arange(0, 61, dtype=F64)
    y = (gain * k)[None]
    score = grad_of(lambda t: negative_binomial_log_pmf(t, a, b, gain), y)
    geometric_mean = gain * torch.exp(torch.digamma(a + k)) / (b * gain + 1)
    exact = tweedie(y, score, "poisson", gain=gain, digamma=True)[0]
    assert torch.allclose(exact, geometric_mean, rtol=1e-12)
    # Noise2Score's closed form is the same with log(k + 1/2) for psi(k + 1): a factor in
    # (exp(-1 / (24 (k + 1/2)^2)), 1)
    ratio = tweedie(y, score, PoissonNoise(gain))[0] / exact
    assert torch.allclose(ratio, (k + 0.5) / torch.exp(torch.digamma(k + 1)), rtol=1e-12)
    assert (ratio < 1).all() and (ratio > torch.exp(-1 / (24 * (k + 0.5) ** 2))).all()
    # neither is the posterior mean gain (a + k) / (b gain + 1), which is larger (Jensen)
    assert (gain * (a + k) / (b * gain + 1) > exact).all()


def test_digamma_stirling_gap_is_bounded():
    """0 < psi(k + 1) - log(k + 1/2) < 1 / (24 (k + 1/2)^2), the bound the documentation states."""
    k = torch.arange(0, 500, dtype=F64)
    gap = torch.digamma(k + 1) - torch.log(k + 0.5)
    assert (gap > 0).all() and (gap < 1 / (24 * (k + 0.5) ** 2)).all()


def inverse_gamma_log_marginal(y, a, b, alpha, beta):
    """log p(y) up to a constant for x ~ InvGamma(a, b) (1/x ~ Gamma(a, rate b)), y = x G, G ~ Gamma(alpha, rate beta)."""
    return (alpha - 1) * torch.log(y) - (alpha + a) * torch.log(b + beta * y)


def test_inverse_gamma_marginal_score_matches_quadrature():
    a, b, alpha, beta = 4.0, 3.0, 5.0, 2.0
    x = torch.linspace(1e-3, 60, 400_001, dtype=F64)
    log_prior = -(a + 1) * torch.log(x) - b / x

    def log_p(y0):
        log_lik = alpha * torch.log(beta / x) + (alpha - 1) * math.log(y0) - beta * y0 / x
        return torch.log(torch.trapezoid(torch.exp(log_prior + log_lik), x))

    h = 1e-4
    for y0 in (0.3, 1.0, 2.5):
        numeric = (log_p(y0 + h) - log_p(y0 - h)) / (2 * h)
        closed = grad_of(
            lambda t: inverse_gamma_log_marginal(t, a, b, alpha, beta),
            torch.tensor([y0], dtype=F64),
        )
        assert numeric.item() == pytest.approx(closed.item(), rel=1e-6)


@pytest.mark.parametrize("alpha,beta", [(5.0, 2.0), (10.0, 10.0)])
def test_gamma_tweedie_is_the_posterior_harmonic_mean(alpha, beta):
    """Inverse-gamma prior, y = x G: the formula is 1 / E[1/x | y] = (b + beta y) / (a + alpha) exactly."""
    a, b = 4.0, 3.0
    y = torch.linspace(0.05, 5.0, 40, dtype=F64)[None]
    score = grad_of(lambda t: inverse_gamma_log_marginal(t, a, b, alpha, beta), y)
    x_hat = tweedie(y, score, "gamma", shape=alpha, rate=beta)
    assert torch.allclose(x_hat, (b + beta * y) / (a + alpha), rtol=1e-12)
    # the posterior mean (b + beta y) / (a + alpha - 1) is larger
    assert ((b + beta * y) / (a + alpha - 1) > x_hat).all()
    if alpha == beta:
        # the library's GammaNoise(k) is alpha = beta = k
        assert torch.equal(tweedie(y, score, GammaNoise(alpha)), x_hat)


def test_tweedie_refuses_bad_input():
    y, s = torch.rand(2, 3) + 0.1, torch.zeros(2, 3)
    with pytest.raises(ValueError, match="exponential families"):
        tweedie(y, s, "laplace", std=1.0)
    with pytest.raises(ValueError, match="exponential families"):
        tweedie(y, s, PoissonGaussianNoise(1.0, 0.1))
    with pytest.raises(ValueError, match=r"missing \['std'\]"):
        tweedie(y, s, "gaussian")
    with pytest.raises(ValueError, match=r"unexpected \['gain'\]"):
        tweedie(y, s, "gaussian", std=1.0, gain=2.0)
    with pytest.raises(ValueError, match="its own"):
        tweedie(y, s, GaussianNoise(1.0), std=1.0)
    with pytest.raises(ValueError, match="'std' must be positive"):
        tweedie(y, s, "gaussian", std=-1.0)
    with pytest.raises(ValueError, match="digamma"):
        tweedie(y, s, "gaussian", std=1.0, digamma=True)
    with pytest.raises(ValueError, match="shape of y"):
        tweedie(y, s[:1], "gaussian", std=1.0)
    with pytest.raises(ValueError, match="does not fit"):
        tweedie(y, s, "gaussian", std=torch.ones(3))
    with pytest.raises(ValueError, match="non-negative"):
        tweedie(-y, s, "poisson", gain=1.0)
    with pytest.raises(ValueError, match="positive"):
        tweedie(y - 1, s, "gamma", shape=2.0)
    with pytest.raises(ValueError, match="finite"):
        tweedie(y, s / 0, "gaussian", std=1.0)


def minimise_ardae(y, u, sigma_a):
    """The affine network minimising the AR-DAE loss on fixed data and noise (a quadratic: L-BFGS is exact)."""
    torch.manual_seed(0)
    net = torch.nn.Linear(y.shape[1], y.shape[1]).double()
    optimizer = torch.optim.LBFGS(
        net.parameters(),
        lr=1,
        max_iter=200,
        tolerance_grad=1e-12,
        tolerance_change=1e-15,
        line_search_fn="strong_wolfe",
    )

    def closure():
        optimizer.zero_grad()
        loss = ardae_loss(net, y, sigma_a, u).mean()
        loss.backward()
        return loss

    optimizer.step(closure)
    return net


def test_ardae_minimiser_converges_to_the_true_score():
    """For y ~ N(mu, S), the affine minimiser of the AR-DAE loss is the score of N(mu, S + s_a^2 I).

    Its distance to the true score -S^{-1} is then the smoothing bias ||(S + s_a^2 I)^{-1} - S^{-1}||,
    which vanishes as s_a -> 0, up to the regression's Monte-Carlo error
    sqrt(tr(R) tr(C^{-1}) / N), R = S C^{-1} / s_a^2, C = S + s_a^2 I (the residual and
    regressor covariances).
    """
    g = torch.Generator().manual_seed(0)
    mu = torch.tensor([0.5, -1.0], dtype=F64)
    L = torch.tensor([[1.0, 0.0], [0.6, 0.8]], dtype=F64)
    S = L @ L.T
    n = 20_000
    y = mu + torch.randn(n, 2, generator=g, dtype=F64) @ L.T
    u = torch.randn(n, 2, generator=g, dtype=F64)
    true = -torch.linalg.inv(S)
    errors = []
    for sigma_a in (1.0, 0.5, 0.25):
        net = minimise_ardae(y, u, sigma_a)
        C = S + sigma_a**2 * torch.eye(2, dtype=F64)
        smoothed = -torch.linalg.inv(C)
        mc = math.sqrt(
            torch.trace(S @ torch.linalg.inv(C)).item()
            / sigma_a**2
            * torch.trace(torch.linalg.inv(C)).item()
            / n
        )
        W = net.weight.detach()
        assert (W - smoothed).norm() < 3 * mc
        assert torch.allclose(
            net.bias.detach(), -smoothed @ mu, atol=3 * mc * mu.norm().item() + 3 * mc
        )
        bias = (smoothed - true).norm().item()
        error = (W - true).norm().item()
        assert abs(error - bias) < 3 * mc
        errors.append(error)
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.2 * errors[0]


def test_ardae_loss_minimum_for_a_gaussian():
    """At the exact smoothed score the loss is s^2 / (s^2 + s_a^2) for y ~ N(0, s^2 I)."""
    g = torch.Generator().manual_seed(3)
    s, sigma_a = 0.8, 0.5
    y = s * torch.randn(200_000, 2, generator=g, dtype=F64)
    u = torch.randn(200_000, 2, generator=g, dtype=F64)
    loss = ardae_loss(lambda t: -t / (s**2 + sigma_a**2), y, sigma_a, u).mean()
    # the per-sample loss has standard deviation below 2, so 5e-3 is over 10 standard errors
    assert loss.item() == pytest.approx(s**2 / (s**2 + sigma_a**2), abs=5e-3)
    with pytest.raises(ValueError, match="sigma_a"):
        ardae_loss(torch.nn.Identity(), y, 0.0, u)


def gaussian_data(n, seed, mu=0.3, sx=0.5, sigma=0.4):
    g = torch.Generator().manual_seed(seed)
    x = mu + sx * torch.randn(n, 2, generator=g)
    return x, x + sigma * torch.randn(n, 2, generator=g)


def test_noise2score_learns_the_gaussian_posterior_mean():
    """Trained on noisy data only, the score network's Tweedie estimate reaches the MMSE.

    x ~ N(mu, sx^2 I), y = x + sigma n: the AR-DAE score at the end of the annealing is
    -(y - mu) / (v + sigma_end^2), v = sx^2 + sigma^2, and the Bayes error is sx^2 sigma^2 / v
    (the noisy data have sigma^2, 64 % more).
    """
    mu, sx, sigma, sigma_end = 0.3, 0.5, 0.4, 0.1
    _, y = gaussian_data(4096, 0, mu, sx, sigma)
    torch.manual_seed(0)
    net = torch.nn.Linear(2, 2)
    config = ScoreConfig(
        steps=600, batch_size=512, lr=0.05, sigma_start=0.5, sigma_end=sigma_end, anneal=0.5, clip=0
    )
    result = train_score(net, y, config, generator=torch.Generator().manual_seed(0), progress=False)
    assert result.sigmas[0] == 0.5 and result.sigmas[-1] == pytest.approx(sigma_end)
    v = sx**2 + sigma**2
    expected = -torch.eye(2) / (v + sigma_end**2)
    # measured 0.11 to 0.20 over 8 seeds (SGD noise); ||expected|| = 3.4
    assert (net.weight.detach() - expected).norm() < 0.35
    x_test, y_test = gaussian_data(20_000, 1, mu, sx, sigma)
    with torch.no_grad():
        x_hat = Noise2Score(net, "gaussian", std=sigma)(y_test)
    mmse = sx**2 * sigma**2 / v
    assert ((x_hat - x_test) ** 2).mean().item() < 1.05 * mmse


def test_training_decreases_the_loss_to_its_minimum():
    """At a fixed s_a, the loss on held-out data falls to the Gaussian minimum v / (v + s_a^2)."""
    mu, sx, sigma, sigma_a = 0.3, 0.5, 0.4, 0.5
    _, y = gaussian_data(4096, 2, mu, sx, sigma)
    _, y_eval = gaussian_data(20_000, 3, mu, sx, sigma)
    u = torch.randn(y_eval.shape, generator=torch.Generator().manual_seed(4))
    torch.manual_seed(1)
    net = torch.nn.Linear(2, 2)
    with torch.no_grad():
        before = ardae_loss(net, y_eval, sigma_a, u).mean().item()
    config = ScoreConfig(
        steps=300, batch_size=256, lr=0.05, sigma_start=sigma_a, sigma_end=sigma_a, clip=0
    )
    train_score(net, y, config, generator=torch.Generator().manual_seed(0), progress=False)
    with torch.no_grad():
        after = ardae_loss(net, y_eval, sigma_a, u).mean().item()
    v = sx**2 + sigma**2
    minimum = v / (v + sigma_a**2)
    # measured within 0.009 of the minimum over 8 seeds (Monte-Carlo error of the evaluation
    # about 0.005)
    assert abs(after - minimum) < 0.015
    assert before - after > 0.1


def test_resume_continues_exactly(tmp_path):
    """A run stopped at a checkpoint and resumed ends with the weights of an uninterrupted one."""
    _, y = gaussian_data(256, 5)
    config = ScoreConfig(
        steps=20, batch_size=32, lr=0.01, sigma_start=0.5, sigma_end=0.1, checkpoint_every=5
    )

    def fresh(seed):
        torch.manual_seed(seed)
        return torch.nn.Linear(2, 2)

    full = train_score(
        fresh(0),
        y,
        config,
        generator=torch.Generator().manual_seed(0),
        checkpoint=tmp_path / "full.pt",
        progress=False,
    )

    class Stop(Exception):
        pass

    def kill_at_12(step, loss):
        if step == 12:
            raise Stop

    with pytest.raises(Stop):
        train_score(
            fresh(0),
            y,
            config,
            generator=torch.Generator().manual_seed(0),
            checkpoint=tmp_path / "run.pt",
            callback=kill_at_12,
            progress=False,
        )
    assert load_checkpoint(tmp_path / "run.pt", keys=("training",))["training"]["step"] == 10
    resumed = train_score(
        fresh(7),
        y,
        config,
        generator=torch.Generator().manual_seed(9),
        checkpoint=tmp_path / "run.pt",
        resume=True,
        progress=False,
    )
    assert resumed.losses == full.losses
    for a, b in zip(
        resumed.network.state_dict().values(), full.network.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="other options"):
        train_score(
            fresh(0),
            y,
            ScoreConfig(steps=20, batch_size=16),
            checkpoint=tmp_path / "run.pt",
            resume=True,
            progress=False,
        )


def test_unet_score_network_checkpoint_rebuilds(tmp_path):
    """A U-Net without noise conditioning trains, and its checkpoint rebuilds the same denoiser."""
    y = torch.rand(16, 1, 8, 8) + 0.5
    torch.manual_seed(0)
    net = UNet(1, channels=(8, 16), blocks=1, noise_conditioning=False)
    config = ScoreConfig(steps=3, batch_size=4, checkpoint_every=2)
    train_score(
        net,
        y,
        config,
        generator=torch.Generator().manual_seed(0),
        checkpoint=tmp_path / "score.pt",
        progress=False,
    )
    state = load_checkpoint(tmp_path / "score.pt", keys=("kind", "network", "state_dict"))
    assert state["kind"] == "noise2score" and state["metadata"]["step"] == 3
    rebuilt = build_network(state["network"]["name"], **state["network"]["config"])
    rebuilt.load_state_dict(state["state_dict"])
    denoiser = Noise2Score(net, "gamma", shape=20.0)
    with torch.no_grad():
        x_hat = denoiser(y)
        assert x_hat.shape == y.shape
        assert torch.equal(Noise2Score(rebuilt.eval(), "gamma", shape=20.0)(y), x_hat)


def test_train_score_refuses_bad_input():
    with pytest.raises(ValueError, match="NaN"):
        train_score(torch.nn.Linear(2, 2), torch.full((4, 2), float("nan")), progress=False)
    with pytest.raises(ValueError, match="no parameters"):
        train_score(torch.nn.Identity(), torch.zeros(4, 2), progress=False)
    with pytest.raises(ValueError, match="maps an input of shape"):
        train_score(torch.nn.Linear(2, 3), torch.zeros(4, 2), progress=False)
    with pytest.raises(ValueError, match="sigma_end <= sigma_start"):
        ScoreConfig(sigma_start=0.01, sigma_end=0.1)
    with pytest.raises(ValueError, match="anneal"):
        ScoreConfig(anneal=0.0)
    with pytest.raises(ValueError, match="exponential families"):
        Noise2Score(torch.nn.Identity(), "laplace")


def test_noise2score_runs_on_every_device(device):
    y = torch.rand(8, 1, 8, 8) + 0.5
    torch.manual_seed(0)
    net = UNet(1, channels=(8, 16), blocks=1, noise_conditioning=False).to(device)
    train_score(
        net,
        y,
        ScoreConfig(steps=2, batch_size=4),
        generator=torch.Generator().manual_seed(0),
        progress=False,
    )
    with torch.no_grad():
        x_hat = Noise2Score(net, "poisson", gain=torch.full((8,), 0.1))(y.to(device))
    assert x_hat.device.type == device.type and torch.isfinite(x_hat).all()
