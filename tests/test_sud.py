import math

import pytest
import torch

from cleanprior.diffusion.precondition import PreconditionedDenoiser
from cleanprior.learning.sud import (
    LatentHook,
    SUDConfig,
    decorrelation_loss,
    pseudo_label_loss,
    sud2_target,
    sud_target,
    train_reconstruction,
)
from cleanprior.nn import MLP, UNet
from cleanprior.reference import GaussianMixture
from cleanprior.runs.checkpoint import load_checkpoint

F64 = torch.float64


def mixture(d=3):
    means = torch.tensor([[-1.0] * d, [1.0] * d], dtype=F64)
    return GaussianMixture.isotropic(means, torch.tensor([0.3, 0.5], dtype=F64))


def test_sud_gradient_is_twice_the_residual_to_a_constant_target():
    """d L_den / d f = 2 (f - D(f + nu_2, sigma_2)) / (B n) with nu_2 fixed: no term through D."""
    prior = mixture()
    g = torch.Generator().manual_seed(0)
    output = torch.randn(5, 3, generator=g, dtype=F64, requires_grad=True)
    z = torch.randn(5, 3, generator=g, dtype=F64)
    sigma_2 = 0.4
    target = sud_target(output, prior.denoiser, sigma_2, z)
    assert not target.requires_grad
    (grad,) = torch.autograd.grad(pseudo_label_loss(output, target), output)
    D = prior.denoiser(output.detach() + sigma_2 * z, sigma_2)
    assert torch.allclose(grad, 2 * (output.detach() - D) / output.numel(), atol=1e-14)
    # differentiating through the denoiser would add -J^T (f - D): the test tells them apart
    (through,) = torch.autograd.grad(
        ((output - prior.denoiser(output + sigma_2 * z, sigma_2)) ** 2).mean(), output
    )
    assert (through - grad).abs().max() > 1e-3


@pytest.mark.parametrize("target", ["sud", "sud2"])
def test_no_gradient_reaches_the_prior(target):
    torch.manual_seed(0)
    prior = PreconditionedDenoiser(MLP(3, hidden=(16,)))
    output = torch.randn(4, 3, requires_grad=True)
    z = torch.randn(4, 3)
    if target == "sud":
        T = sud_target(output, prior, 0.3, z)
    else:
        T = sud2_target(
            output,
            prior,
            0.5,
            z,
            steps=3,
            sampler="ddpm",
            generator=torch.Generator().manual_seed(1),
        )
    assert not T.requires_grad
    loss = pseudo_label_loss(output, T)
    loss.backward()
    assert torch.allclose(output.grad, 2 * (output.detach() - T) / output.numel())
    assert all(p.grad is None for p in prior.parameters())


def test_one_deterministic_sud2_step_is_sud():
    """One DDIM step from sigma* to 0 returns D(f + sigma* z, sigma*): SUD at sigma_2 = sigma*."""
    prior = mixture()
    g = torch.Generator().manual_seed(2)
    output, z = torch.randn(6, 3, generator=g, dtype=F64), torch.randn(6, 3, generator=g, dtype=F64)
    one_step = sud2_target(output, prior.denoiser, 0.7, z, steps=1, sampler="ddim")
    assert torch.equal(one_step, sud_target(output, prior.denoiser, 0.7, z))


def test_sud2_of_a_gaussian_prior_follows_the_probability_flow():
    """For x ~ N(0, I) the probability-flow ODE maps f + sigma* z to (f + sigma* z) / sqrt(1 + sigma*^2)."""
    prior = GaussianMixture.isotropic(torch.zeros(1, 2, dtype=F64), 1.0)
    g = torch.Generator().manual_seed(3)
    output, z = torch.randn(4, 2, generator=g, dtype=F64), torch.randn(4, 2, generator=g, dtype=F64)
    T = sud2_target(output, prior.denoiser, 0.8, z, steps=64, sampler="heun")
    assert torch.allclose(T, (output + 0.8 * z) / math.sqrt(1 + 0.8**2), rtol=1e-3)


def test_targets_refuse_bad_input():
    prior = mixture()
    f = torch.zeros(2, 3, dtype=F64)
    with pytest.raises(ValueError, match="sigma_2"):
        sud_target(f, prior.denoiser, 0.0, f)
    with pytest.raises(ValueError, match="noise"):
        sud_target(f, prior.denoiser, 0.1, f[:, :2])
    with pytest.raises(ValueError, match="sigma_star"):
        sud2_target(f, prior.denoiser, 1e-3, f)
    with pytest.raises(ValueError, match="same shape"):
        pseudo_label_loss(f, f[:1])


def test_decorrelation_of_independent_latents_is_monte_carlo_small():
    """|corr| of independent Gaussian vectors of m entries averages sqrt(2 / (pi (m - 1)))."""
    m = 4096
    latents = torch.randn(64, 8, m // 8, generator=torch.Generator().manual_seed(0), dtype=F64)
    expected = math.sqrt(2 / (math.pi * (m - 1)))
    assert decorrelation_loss(latents).item() == pytest.approx(expected, rel=0.1)


def test_decorrelation_of_collapsed_latents_is_maximal():
    """Latents equal up to scale (of either sign) and offset have |corr| = 1, the maximum."""
    g = torch.Generator().manual_seed(1)
    v = torch.randn(256, generator=g, dtype=F64)
    scale = torch.randn(16, 1, generator=g, dtype=F64)
    offset = torch.randn(16, 1, generator=g, dtype=F64)
    latents = scale * v + offset
    assert decorrelation_loss(latents).item() == pytest.approx(1.0, abs=1e-12)
    # a batch of one has no pairs
    assert decorrelation_loss(latents[:1]).item() == 0.0
    # the penalty is differentiable and pushes correlated latents apart
    near = (latents + 0.1 * torch.randn(16, 256, generator=g, dtype=F64)).requires_grad_(True)
    loss = decorrelation_loss(near)
    loss.backward()
    assert (
        decorrelation_loss(near.detach() - 0.5 * near.grad * near.detach().norm() ** 2).item()
        < loss.item()
    )


def test_latent_hook_reads_the_unet_bottleneck():
    torch.manual_seed(0)
    net = UNet(1, channels=(8, 16), blocks=1, noise_conditioning=False)
    y = torch.randn(3, 1, 8, 8)
    with LatentHook(net) as hook:
        net(y)
    _, features = net(y, return_features=True)
    assert torch.equal(hook.latents, features)
    assert len(net.middle[-1]._forward_hooks) == 0
    with pytest.raises(ValueError, match="no module 'bottleneck'"):
        LatentHook(net, "bottleneck")


def linear_gaussian(seed=0, d=4, m=6, s=0.3, pairs=16, unpaired=2048):
    """x ~ N(0, I_d), y = A x + s n with an unknown A (m x d) that no function is given."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(m, d, generator=g) / math.sqrt(d)

    def observe(n):
        x = torch.randn(n, d, generator=g)
        return x, x @ A.T + s * torch.randn(n, m, generator=g)

    x_p, y_p = observe(pairs)
    _, y_u = observe(unpaired)
    return x_p, y_p, y_u


def fixed_point(x_p, y_p, y_u, lam, c):
    """W* = M_xy (M_yy + lam c M_u)^{-1}, the zero of the expected gradient (c = 0 is least squares)."""
    M_xy = x_p.T @ y_p / len(x_p)
    M_yy = y_p.T @ y_p / len(y_p)
    M_u = y_u.T @ y_u / len(y_u)
    return M_xy @ torch.linalg.inv(M_yy + lam * c * M_u)


def train_linear(x_p, y_p, y_u, prior, **options):
    torch.manual_seed(0)
    f = torch.nn.Linear(y_p.shape[1], x_p.shape[1], bias=False)
    config = SUDConfig(
        lambda_2=0.0,
        steps=600,
        batch_paired=len(x_p),
        batch_unpaired=256,
        lr=0.1,
        clip=0,
        **options,
    )
    result = train_reconstruction(
        f,
        (x_p, y_p),
        y_u,
        prior,
        config,
        generator=torch.Generator().manual_seed(1),
        progress=False,
    )
    return result.network.weight.detach()


def test_sud_on_a_linear_gaussian_toy_reaches_the_shrunk_least_squares():
    """With the exact denoiser of N(0, I), SUD's fixed point is M_xy (M_yy + lam c M_u)^{-1}, c = s2^2 / (1 + s2^2)."""
    x_p, y_p, y_u = linear_gaussian()
    prior = GaussianMixture.isotropic(torch.zeros(1, 4), 1.0)
    lam, sigma_2 = 1.0, 0.5
    target = fixed_point(x_p, y_p, y_u, lam, sigma_2**2 / (1 + sigma_2**2))
    least_squares = fixed_point(x_p, y_p, y_u, lam, 0.0)
    gap = (least_squares - target).norm()
    assert gap > 0.5
    W = train_linear(x_p, y_p, y_u, prior.denoiser, method="sud", lambda_1=lam, sigma_2=sigma_2)
    # the SGD noise of the unpaired batches and of nu_2 left at most 0.05 gap over 10 data seeds
    assert (W - target).norm() < 0.15 * gap


def test_sud2_on_a_linear_gaussian_toy_reaches_its_fixed_point():
    """DDIM on a Gaussian prior is linear, T = rho (f + sigma* z), so the fixed point has c = 1 - rho."""
    x_p, y_p, y_u = linear_gaussian(seed=1)
    prior = GaussianMixture.isotropic(torch.zeros(1, 4), 1.0)
    lam, sigma_star, steps = 1.0, 0.8, 4
    rho = sud2_target(
        torch.ones(1, 4), prior.denoiser, sigma_star, torch.zeros(1, 4), steps=steps, sampler="ddim"
    )[0, 0].item()
    # a few DDIM steps approximate the flow's 1 / sqrt(1 + sigma*^2)
    assert rho == pytest.approx(1 / math.sqrt(1 + sigma_star**2), rel=0.2)
    target = fixed_point(x_p, y_p, y_u, lam, 1 - rho)
    gap = (fixed_point(x_p, y_p, y_u, lam, 0.0) - target).norm()
    W = train_linear(
        x_p,
        y_p,
        y_u,
        prior.denoiser,
        method="sud2",
        lambda_1=lam,
        sigma_star=sigma_star,
        sud2_steps=steps,
        sampler="ddim",
    )
    assert (W - target).norm() < 0.15 * gap


def image_problem(seed=0):
    """8 x 8 images from a two-component mixture, half of each observed (the mask is never given)."""
    prior = GaussianMixture.isotropic(
        torch.stack([torch.full((64,), -0.5), torch.full((64,), 0.5)]), 0.3, shape=(1, 8, 8)
    )
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(1, 1, 8, 8, generator=g) > 0.5).float()
    x = prior.sample(40, g)
    y = mask * x + 0.05 * torch.randn(x.shape, generator=g)
    return prior, x[:4], y[:4], y[4:]


def small_unet(seed=0):
    torch.manual_seed(seed)
    return UNet(1, channels=(8, 16), blocks=1, noise_conditioning=False)


def test_resume_continues_exactly(tmp_path):
    """SUD² with the decorrelation and an EMA, stopped at a checkpoint and resumed, ends where one run ends."""
    prior, x_p, y_p, y_u = image_problem()
    config = SUDConfig(
        method="sud2",
        sud2_steps=2,
        steps=8,
        batch_paired=2,
        batch_unpaired=6,
        ema_decay=0.5,
        checkpoint_every=3,
    )
    full = train_reconstruction(
        small_unet(),
        (x_p, y_p),
        y_u,
        prior.denoiser,
        config,
        generator=torch.Generator().manual_seed(0),
        checkpoint=tmp_path / "full.pt",
        progress=False,
    )
    assert all(v > 0 for v in full.history["reg"])

    class Stop(Exception):
        pass

    def kill_at_5(step, loss):
        if step == 5:
            raise Stop

    with pytest.raises(Stop):
        train_reconstruction(
            small_unet(),
            (x_p, y_p),
            y_u,
            prior.denoiser,
            config,
            generator=torch.Generator().manual_seed(0),
            checkpoint=tmp_path / "run.pt",
            callback=kill_at_5,
            progress=False,
        )
    assert load_checkpoint(tmp_path / "run.pt", keys=("metadata",))["metadata"]["step"] == 3
    resumed = train_reconstruction(
        small_unet(9),
        (x_p, y_p),
        y_u,
        prior.denoiser,
        config,
        generator=torch.Generator().manual_seed(4),
        checkpoint=tmp_path / "run.pt",
        resume=True,
        progress=False,
    )
    assert resumed.history == full.history
    for a, b in zip(
        resumed.network.state_dict().values(), full.network.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="other options"):
        train_reconstruction(
            small_unet(),
            (x_p, y_p),
            y_u,
            prior.denoiser,
            SUDConfig(method="sud", steps=8),
            checkpoint=tmp_path / "run.pt",
            resume=True,
            progress=False,
        )


def test_warmup_trains_on_the_pairs_alone_then_adds_the_prior():
    """During the warm-up SUD² is the supervised run step for step (same draws, same losses, so
    the same weights: the first step after it sees the supervised run's paired loss); afterwards
    its pseudo-label and decorrelation terms are on."""
    prior, x_p, y_p, y_u = image_problem()
    common = dict(batch_paired=2, batch_unpaired=6, lr_schedule="constant")
    supervised = train_reconstruction(
        small_unet(),
        (x_p, y_p),
        config=SUDConfig(method="supervised", steps=5, **common),
        generator=torch.Generator().manual_seed(0),
        progress=False,
    )
    warm = train_reconstruction(
        small_unet(),
        (x_p, y_p),
        y_u,
        prior.denoiser,
        SUDConfig(method="sud2", sud2_steps=2, steps=6, warmup=4, **common),
        generator=torch.Generator().manual_seed(0),
        progress=False,
    )
    assert warm.history["loss"][:4] == supervised.history["loss"][:4]
    assert warm.history["paired"][:5] == supervised.history["paired"]
    assert warm.history["den"][:4] == warm.history["reg"][:4] == [0.0] * 4
    assert all(v > 0 for v in warm.history["den"][4:] + warm.history["reg"][4:])
    with pytest.raises(ValueError, match="warmup"):
        SUDConfig(warmup=-1)
    with pytest.raises(ValueError, match=r"warmup \(6\) must be below steps \(6\)"):
        SUDConfig(method="sud2", steps=6, warmup=6)


def test_sud_with_a_network_prior_trains_only_the_reconstruction():
    _, x_p, y_p, y_u = image_problem(1)
    torch.manual_seed(1)
    prior = PreconditionedDenoiser(UNet(1, channels=(8, 16), blocks=1)).eval()
    before = [p.detach().clone() for p in prior.parameters()]
    f = small_unet()
    result = train_reconstruction(
        f,
        (x_p, y_p),
        y_u,
        prior,
        SUDConfig(method="sud", steps=3, batch_unpaired=4),
        generator=torch.Generator().manual_seed(0),
        progress=False,
    )
    assert result.network is f and not f.training
    assert all(p.grad is None for p in prior.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, prior.parameters(), strict=True))
    assert len(result.history["loss"]) == 3
    supervised = train_reconstruction(
        small_unet(),
        (x_p, y_p),
        config=SUDConfig(method="supervised", steps=2),
        generator=torch.Generator().manual_seed(0),
        progress=False,
    )
    assert supervised.history["den"] == supervised.history["reg"] == [0.0, 0.0]


def test_train_reconstruction_refuses_bad_input():
    prior, x_p, y_p, y_u = image_problem()
    f = small_unet()
    with pytest.raises(ValueError, match="needs a prior"):
        train_reconstruction(f, (x_p, y_p), y_u, None, SUDConfig(method="sud"), progress=False)
    with pytest.raises(ValueError, match="needs unpaired"):
        train_reconstruction(
            f, (x_p, y_p), None, prior.denoiser, SUDConfig(method="sud2"), progress=False
        )
    with pytest.raises(ValueError, match="paired ones' shape"):
        train_reconstruction(f, (x_p, y_p), y_u[:, :, :4], prior.denoiser, progress=False)
    with pytest.raises(ValueError, match="as many clean images"):
        train_reconstruction(f, (x_p, y_p[:2]), y_u, prior.denoiser, progress=False)
    with pytest.raises(ValueError, match="NaN"):
        train_reconstruction(f, (x_p, y_p / 0), y_u, prior.denoiser, progress=False)
    with pytest.raises(ValueError, match="no module 'middle'"):
        train_reconstruction(
            torch.nn.Conv2d(1, 1, 3, padding=1), (x_p, y_p), y_u, prior.denoiser, progress=False
        )
    with pytest.raises(ValueError, match="no parameters"):
        train_reconstruction(
            torch.nn.Identity(),
            (x_p, y_p),
            y_u,
            prior.denoiser,
            SUDConfig(lambda_2=0.0),
            progress=False,
        )
    with pytest.raises(ValueError, match="not to an image"):
        train_reconstruction(
            UNet(1, 2, channels=(8,), blocks=1, noise_conditioning=False),
            (x_p, y_p),
            y_u,
            prior.denoiser,
            SUDConfig(lambda_2=0.0),
            progress=False,
        )
    with pytest.raises(ValueError, match="method"):
        SUDConfig(method="cyclegan")
    with pytest.raises(ValueError, match="sigma_star > sigma_min"):
        SUDConfig(sigma_star=1e-3)
    with pytest.raises(ValueError, match="sampler"):
        SUDConfig(sampler="dpm++")
    with pytest.raises(ValueError, match="lambda_1"):
        SUDConfig(lambda_1=-1.0)


def test_sud2_trains_on_every_device(device):
    """Data stay where they are, minibatches move to the network's device, the sampler draws there."""
    prior, x_p, y_p, y_u = image_problem(2)
    f = small_unet().to(device)
    config = SUDConfig(method="sud2", sud2_steps=2, steps=2, batch_paired=2, batch_unpaired=4)
    result = train_reconstruction(
        f,
        (x_p, y_p),
        y_u,
        prior.to(device).denoiser,
        config,
        generator=torch.Generator().manual_seed(0),
        progress=False,
    )
    assert next(result.network.parameters()).device.type == device.type
    assert all(math.isfinite(v) for v in result.history["loss"])
