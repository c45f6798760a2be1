"""Tests of FlowDiff: the score-matching bound, the flow loss, joint training, resume and resets."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch

from cleanprior import GaussianMixture, PreconditionedDenoiser
from cleanprior.data.files import Observations, corrupt_dataset
from cleanprior.diffusion.schedules import SIGMA_MAX, SIGMA_MIN
from cleanprior.diffusion.training import TrainConfig, dsm_loss, sample_sigma
from cleanprior.learning.flowdiff import (
    FlowDiff,
    FlowDiffConfig,
    condition,
    flowdiff_loss,
    make_flow,
    score_matching_bound,
)
from cleanprior.nn import MLP, UNet
from cleanprior.nn.flow import ConditionalFlow
from cleanprior.operators import Mask, Matrix

# A correlated 2-D Gaussian prior seen through one projection y = <a, x> + n: the posterior is a
# correlated Gaussian, narrow along a and as wide as the prior across it.
MEAN = torch.tensor([0.3, -0.2])
COVARIANCE = torch.tensor([[1.0, 0.6], [0.6, 0.5]])
PROJECTION = torch.tensor([[1.0, -0.5]])
NOISE = 0.3


@pytest.fixture(autouse=True, scope="module")
def single_thread() -> Iterator[None]:
    """Tiny networks run faster on one thread on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def seeded(build, seed: int = 0):
    """Build a module with initial weights that do not depend on the global generator's state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def gaussian_problem(n: int = 512) -> tuple[GaussianMixture, Observations]:
    prior = GaussianMixture(torch.ones(1), MEAN[None], COVARIANCE[None])
    g = torch.Generator().manual_seed(0)
    x = prior.sample(n, g)
    y = x @ PROJECTION.T + NOISE * torch.randn(n, 1, generator=g)
    return prior, Observations(y=y, operator=Matrix(PROJECTION[None]), noise_std=NOISE, shape=(2,), x=x)


def image_problem(n: int = 16) -> Observations:
    g = torch.Generator().manual_seed(1)
    x = 0.5 * torch.tanh(torch.randn(n, 1, 4, 4, generator=g))
    return corrupt_dataset(x, "mask", noise_std=0.1, generator=g, missing=0.5)


def image_prior(seed: int = 0) -> PreconditionedDenoiser:
    return seeded(lambda: PreconditionedDenoiser(UNet(1, channels=(8,), blocks=1, emb_features=8)), seed)


def test_condition_is_the_back_projection_and_the_coverage():
    g = torch.Generator().manual_seed(0)
    mask = (torch.rand(3, 1, 4, 4, generator=g) > 0.5).float()
    y = mask * torch.randn(3, 1, 4, 4, generator=g)
    c = condition(Mask(mask), y, (1, 4, 4))
    # A^T y = m * y and A^T A 1 = m^2 = m for a binary mask
    assert torch.equal(c, torch.cat([mask * y, mask], dim=1))
    A = torch.randn(3, 1, 2, generator=g)
    y = torch.randn(3, 1, generator=g)
    c = condition(Matrix(A), y, (2,))
    expected = torch.cat([(A.mT @ y[..., None])[..., 0], (A.mT @ A @ torch.ones(3, 2, 1))[..., 0]], dim=1)
    torch.testing.assert_close(c, expected)


def test_score_matching_bound_is_tight_for_a_gaussian_prior():
    """With the exact denoiser of N(mu, S), the bound is 1/2 (x - mu)^T [(S + s_min^2)^-1 - (S + s_max^2)^-1] (x - mu)
    + |x|^2 / (2 s_max^2) + const: -log N(x; mu, S + s_min^2 I) up to a constant and O(1e-6) terms. Differences
    between points (same levels and noise for all, so that the constant's noise cancels) match to 4
    standard errors."""
    prior = GaussianMixture(torch.ones(1), MEAN[None].double(), COVARIANCE[None].double())
    points = torch.tensor([[0.0, 0.0], [1.5, -1.0], [-1.0, 2.0]], dtype=torch.float64)
    n = 20_000
    bounds = score_matching_bound(prior.denoiser, points.repeat_interleave(n, 0), levels=8,
                                  generator=torch.Generator().manual_seed(0)).reshape(3, n)
    differences = bounds[1:] - bounds[:1]
    eye = torch.eye(2, dtype=torch.float64)
    low = torch.linalg.inv(COVARIANCE.double() + SIGMA_MIN**2 * eye)
    high = torch.linalg.inv(COVARIANCE.double() + SIGMA_MAX**2 * eye)
    r = points - MEAN.double()
    exact = 0.5 * ((r @ low) * r).sum(1) - 0.5 * ((r @ high) * r).sum(1) + 0.5 * (points**2).sum(1) / SIGMA_MAX**2
    error = differences.mean(1) - (exact[1:] - exact[:1])
    standard_error = differences.std(1) / math.sqrt(n)
    assert (error.abs() < 4 * standard_error).all(), (error, standard_error)
    # and the exact answer is -log p but for the widening of S by s_min^2, a relative change of
    # s_min^2 / lambda_min(S) = 4e-5 here: the bound is tight
    log_p = prior.log_prob(points)
    torch.testing.assert_close(exact[1:] - exact[:1], -(log_p[1:] - log_p[:1]), rtol=1e-4, atol=0)


def test_flow_learns_the_exact_gaussian_posterior_against_a_fixed_exact_prior():
    """With the exact prior denoiser the flow loss is KL(q || p(x | y)) + const, so training only the flow
    must land on the posterior. Tolerance: KL < 0.02 nats, while a prior term off by a factor of 2
    (either way) moves the optimum by KL >= 0.11 nats for these observations. For Gaussians,
    KL >= |m_q - m|^2_{S^-1} / 2 bounds the whitened mean error by sqrt(2 KL) = 0.2 (plus 0.06 for the
    99.9% quantile of the Monte-Carlo error of 4000 samples), and KL >= sum(l - 1 - log l) / 2 bounds
    the whitened covariance's eigenvalues l within [0.75, 1.3] (plus 0.1 for sampling)."""
    prior, observations = gaussian_problem()
    config = FlowDiffConfig(batch_size=512, flow_lr=2e-3, prior_steps_per_flow_step=0, bound_levels=16,
                            hidden=32, layers=2, checkerboard=0, blocks=0)
    flowdiff = FlowDiff(seeded(lambda: make_flow((2,), config)), prior.denoiser, config)
    flowdiff.run(observations, 200)
    assert flowdiff.denoiser == prior.denoiser

    y = torch.tensor([[-1.0], [0.0], [1.5]])
    n = 4000
    c = condition(Matrix(PROJECTION[None]), y.repeat_interleave(n, 0), (2,))
    with torch.no_grad():
        x, log_q = flowdiff.flow.sample(c, torch.Generator().manual_seed(1))
    for i in range(3):
        posterior = prior.posterior(PROJECTION, y[i], NOISE)
        rows = slice(i * n, (i + 1) * n)
        kl = (log_q[rows].double() - posterior.log_prob(x[rows].double())).mean()
        assert kl < 0.02
        whiten = torch.linalg.inv(torch.linalg.cholesky(posterior.covariances[0]))
        samples = x[rows].double()
        mean_error = (whiten @ (samples.mean(0) - posterior.means[0])).norm()
        eigenvalues = torch.linalg.eigvalsh(whiten @ torch.cov(samples.T) @ whiten.T)
        assert mean_error < math.sqrt(2 * 0.02) + 0.06
        assert eigenvalues.min() > 0.75 - 0.1 and eigenvalues.max() < 1.3 + 0.1


def test_joint_training_lowers_the_flow_loss_and_learns_the_prior():
    """Flow and MLP prior from scratch on random projections of a 2-D Gaussian (a different
    direction per observation). The untrained flow is N(0, I) whatever y, so its loss is dominated
    by the misfit |y - A z|^2 / (2 sigma_y^2), about (E y^2 + 1) / (2 * 0.1^2) = 50 nats per
    observation, 25 per dimension; a flow that explains y within the noise pays about 1/2 nat for
    it, and its prior and entropy terms are O(1) per dimension. So the loss must fall by far more
    than half."""
    g = torch.Generator().manual_seed(0)
    prior = GaussianMixture(torch.ones(1), MEAN[None], COVARIANCE[None])
    x = prior.sample(256, g)
    observations = corrupt_dataset(x, "matrix", noise_std=0.1, generator=g, m=1)
    config = FlowDiffConfig(batch_size=64, hidden=16, layers=2, checkerboard=0, blocks=0, flow_lr=3e-3,
                            prior_lr=3e-3, ema_decay=0.9, bound_levels=2)
    denoiser = seeded(lambda: PreconditionedDenoiser(MLP(2, hidden=(32, 32), emb_features=8)))
    flowdiff = FlowDiff(seeded(lambda: make_flow((2,), config)), denoiser, config)
    flowdiff.run(observations, 100)
    flow_loss = flowdiff.losses["flow"]
    assert len(flow_loss) == len(flowdiff.losses["prior"]) == 100
    first, last = sum(flow_loss[:20]) / 20, sum(flow_loss[-20:]) / 20
    assert last < first / 2, (first, last)

    # The prior, trained only on flow samples, denoises the clean data better than it did untrained:
    # it closes at least a quarter of the gap to the exact denoiser's loss (100 steps close half).
    class Exact(torch.nn.Module):
        sigma_data = 0.5

        def forward(self, x_t, sigma):
            return prior.denoiser(x_t, sigma)

    clean = prior.sample(20_000, torch.Generator().manual_seed(5))
    sigma = sample_sigma(TrainConfig(), 20_000, torch.Generator().manual_seed(6))
    untrained = seeded(lambda: PreconditionedDenoiser(MLP(2, hidden=(32, 32), emb_features=8)))
    with torch.no_grad():
        before, after, best = (dsm_loss(d, clean, sigma, torch.Generator().manual_seed(7)).mean()
                               for d in (untrained, flowdiff.denoiser, Exact()))
    assert after < before - 0.25 * (before - best), (before, after, best)


def test_resuming_from_a_state_equals_an_uninterrupted_run(tmp_path):
    """Images behind masks, a U-Net prior, resets of both models inside the run: 6 steps in one go
    equal 3 steps, a save to disk, a rebuild with other initial weights, a load, and 3 more."""
    from cleanprior.runs.checkpoint import load_checkpoint, save_checkpoint

    observations = image_problem()
    config = FlowDiffConfig(batch_size=4, hidden=8, layers=2, checkerboard=1, blocks=1, reset_flow_every=4,
                            reset_prior_every=5, ema_decay=0.5, bound_levels=2, seed=3)

    def fresh(seed: int) -> FlowDiff:
        return FlowDiff(seeded(lambda: make_flow((1, 4, 4), config), seed), image_prior(seed), config)

    whole = fresh(0)
    whole.run(observations, 6)
    first = fresh(0)
    first.run(observations, 3)
    save_checkpoint(tmp_path / "state.pt", first.state_dict())
    second = fresh(1)
    second.load_state_dict(load_checkpoint(tmp_path / "state.pt", keys=("step",)))
    second.run(observations, 6)

    assert whole.resets == second.resets == [(4, "flow"), (5, "prior")]
    assert whole.losses == second.losses
    for a, b in [(whole.flow, second.flow), (whole.prior, second.prior), (whole.ema, second.ema)]:
        for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
            torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=name)
    assert isinstance(second.denoiser, PreconditionedDenoiser) and second.denoiser is second.ema
    x = second.amortized(observations.operator, observations.y, samples=3, generator=torch.Generator().manual_seed(0))
    assert x.shape == (16, 3, 1, 4, 4)
    assert second.amortized(observations.operator, observations.y).shape == (16, 1, 4, 4)


def test_resets_happen_at_the_configured_steps_and_start_afresh():
    observations = image_problem()
    config = FlowDiffConfig(batch_size=4, hidden=8, layers=1, checkerboard=1, blocks=0, reset_flow_every=3,
                            reset_prior_every=5, bound_levels=1, ema_decay=0.5)
    flowdiff = FlowDiff(seeded(lambda: make_flow((1, 4, 4), config)), image_prior(), config)
    flowdiff.run(observations, 3)
    assert flowdiff.resets == []
    flowdiff.run(observations, 10)
    # before steps 3, 6, 9 (flow) and 5 (prior); not before step 10, which was not run
    assert flowdiff.resets == [(3, "flow"), (5, "prior"), (6, "flow"), (9, "flow")]

    trained = {k: v.clone() for k, v in flowdiff.prior.state_dict().items()}
    flowdiff.reset_flow()
    flowdiff.reset_prior()
    # a fresh flow is the identity times its base scale again, and its optimiser has no state
    z = torch.randn(2, 1, 4, 4)
    c = torch.randn(2, 2, 4, 4)
    torch.testing.assert_close(flowdiff.flow(z, c)[0], z)
    assert flowdiff.state_dict()["flow_optimizer"] is None
    # a fresh prior differs from the trained one, and its EMA starts from it
    assert any(not torch.equal(v, flowdiff.prior.state_dict()[k]) for k, v in trained.items())
    for p, q in zip(flowdiff.prior.parameters(), flowdiff.ema.parameters()):
        assert torch.equal(p, q)
    assert flowdiff.state_dict()["prior_optimizer"] is None


def test_flowdiff_loss_has_gradients_for_the_flow_and_none_for_a_fixed_prior_step():
    _, observations = gaussian_problem(8)
    flow = seeded(lambda: make_flow((2,), FlowDiffConfig(hidden=8, layers=2, checkerboard=0)))
    denoiser = seeded(lambda: PreconditionedDenoiser(MLP(2, hidden=(8,), emb_features=8)))
    loss = flowdiff_loss(flow, denoiser, observations.operator, observations.y, NOISE,
                         generator=torch.Generator().manual_seed(0))
    assert loss.shape == (8,)
    loss.mean().backward(inputs=list(flow.parameters()))
    assert all(p.grad is None for p in denoiser.parameters())
    assert flow.log_base_scale.grad.abs().sum() > 0
    # the path-gradient estimator changes gradients, never values
    same = flowdiff_loss(flow, denoiser, observations.operator, observations.y, NOISE, path_gradient=False,
                         generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(same, loss.detach(), rtol=1e-5, atol=1e-5)


def test_invalid_inputs_raise_before_any_work():
    prior, observations = gaussian_problem(8)
    config = FlowDiffConfig(prior_steps_per_flow_step=0, hidden=8, layers=1, checkerboard=0)
    flowdiff = FlowDiff(make_flow((2,), config), prior.denoiser, config)
    noiseless = Observations(y=observations.y, operator=observations.operator, noise_std=0.0, shape=(2,))
    with pytest.raises(ValueError, match="noise_std > 0"):
        flowdiff.run(noiseless, 1)
    with pytest.raises(ValueError, match="shape"):
        flowdiff.run(image_problem(), 1)
    assert flowdiff.step == 0
    with pytest.raises(ValueError, match="condition channels"):
        FlowDiff(ConditionalFlow((2,), 3, hidden=8, layers=1, checkerboard=0), prior.denoiser, config)
    with pytest.raises(ValueError, match="trainable parameters"):
        FlowDiff(make_flow((2,), config), prior.denoiser, FlowDiffConfig())
    with pytest.raises(ValueError, match="reset_prior_every"):
        FlowDiff(make_flow((2,), config), prior.denoiser, FlowDiffConfig(prior_steps_per_flow_step=0, reset_prior_every=2))
    with pytest.raises(ValueError, match="batch_size"):
        FlowDiffConfig(batch_size=0)
    with pytest.raises(ValueError, match="ema_decay"):
        FlowDiffConfig(ema_decay=1.0)
    with pytest.raises(ValueError, match="samples"):
        flowdiff.amortized(observations.operator, observations.y, samples=0)
    with pytest.raises(ValueError, match="other options"):
        other = FlowDiff(make_flow((2,), config), prior.denoiser, FlowDiffConfig(prior_steps_per_flow_step=0, hidden=8,
                                                                                   layers=1, checkerboard=0, seed=1))
        other.load_state_dict(flowdiff.state_dict())
