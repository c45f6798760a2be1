"""Tests of AmbientDiffusion (masked and noisy data) and of the mask-conditioned networks."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from cleanprior.diffusion.precondition import PreconditionedDenoiser
from cleanprior.diffusion.training import TrainConfig, train
from cleanprior.learning.ambient import (
    AmbientDenoiser,
    AmbientLoss,
    AmbientNoisyDenoiser,
    AmbientNoisyLoss,
    FixedMaskDenoiser,
    masked_denoise,
)
from cleanprior.nn import MLP, MaskedMLP, MaskedUNet, build_network
from cleanprior.reference import GaussianMixture
from cleanprior.runs.checkpoint import load_denoiser, save_denoiser


def gaussian(
    d: int = 4, seed: int = 0, dtype: torch.dtype = torch.float32
) -> tuple[Tensor, Tensor]:
    """A correlated zero-mean Gaussian of average variance 0.25: covariance, Cholesky factor."""
    g = torch.Generator().manual_seed(seed)
    L = torch.randn(d, d, generator=g, dtype=dtype)
    cov = L @ L.T + 0.1 * torch.eye(d, dtype=dtype)
    cov = cov * (0.25 * d / cov.trace())
    return cov, torch.linalg.cholesky(cov)


def posterior_mean(cov: Tensor, x_t: Tensor, sigma: Tensor, mask: Tensor) -> Tensor:
    """E[x | M x_t, M] for x ~ N(0, cov): Sigma P (P Sigma P + sigma^2 I)^-1 P x_t, P = diag(M)."""
    P = torch.diag_embed(mask)
    system = P @ cov @ P + sigma[:, None, None] ** 2 * torch.eye(cov.shape[0], dtype=cov.dtype)
    return (cov @ P @ torch.linalg.solve(system, (mask * x_t)[..., None]))[..., 0]


def small_masked_unet(seed: int = 0) -> PreconditionedDenoiser:
    torch.manual_seed(seed)
    net = MaskedUNet(1, channels=(8, 16), blocks=1, attention_levels=(), emb_features=16)
    # the zero-initialised head would make every output 0 and every comparison vacuous
    nn.init.normal_(net.unet.head.weight, std=0.1)
    return PreconditionedDenoiser(net, sigma_data=0.5)


# --------------------------------------------------------------------------------------------
# Mask-conditioned networks


@pytest.mark.parametrize("kind", ["unet", "mlp"])
def test_masked_networks_ignore_erased_entries(kind):
    g = torch.Generator().manual_seed(0)
    if kind == "unet":
        net, shape = small_masked_unet().network, (3, 1, 8, 8)
    else:
        torch.manual_seed(0)
        net, shape = MaskedMLP(5, hidden=(16,), emb_features=8), (3, 5)
    x = torch.randn(shape, generator=g)
    mask = (torch.rand(shape, generator=g) > 0.5).float()
    c = torch.randn(3, generator=g)
    out = net(x, c, mask=mask)
    changed = x + (1 - mask) * torch.randn(shape, generator=g)
    torch.testing.assert_close(net(changed, c, mask=mask), out, rtol=0, atol=0)
    torch.testing.assert_close(net(x, c), net(x, c, mask=torch.ones(shape)), rtol=0, atol=0)
    assert not torch.allclose(out, net(x, c))
    clone = build_network(type(net).__name__, **net.config)
    assert type(clone) is type(net) and clone.config == net.config


def test_masked_unet_takes_a_mask_shared_by_the_channels():
    torch.manual_seed(0)
    net = MaskedUNet(3, channels=(8,), blocks=1, attention_levels=(), emb_features=8)
    nn.init.normal_(net.unet.head.weight, std=0.1)
    x, c = torch.randn(2, 3, 4, 4), torch.zeros(2)
    pixels = (torch.rand(2, 1, 4, 4) > 0.5).float()
    torch.testing.assert_close(net(x, c, mask=pixels), net(x, c, mask=pixels.expand(2, 3, 4, 4)))
    with pytest.raises(ValueError, match="mask of shape"):
        net(x, c, mask=torch.ones(2, 2, 4, 4))
    with pytest.raises(ValueError, match="3, H, W"):
        net(torch.randn(2, 1, 4, 4), c)


def test_masked_denoise_with_a_full_mask_is_the_plain_denoiser():
    denoiser = small_masked_unet()
    x, sigma = torch.randn(4, 1, 8, 8), torch.tensor([0.01, 0.3, 1.0, 20.0])
    torch.testing.assert_close(
        masked_denoise(denoiser, x, sigma, torch.ones_like(x)), denoiser(x, sigma)
    )
    with pytest.raises(TypeError, match="does not take a mask"):
        masked_denoise(
            PreconditionedDenoiser(MLP(4, hidden=(8,))), torch.randn(2, 4), 1.0, torch.ones(2, 4)
        )


def test_masked_denoisers_save_and_load(tmp_path):
    for denoiser, x in (
        (small_masked_unet(), torch.randn(3, 1, 8, 8)),
        (PreconditionedDenoiser(MaskedMLP(4, hidden=(16, 16), emb_features=8)), torch.randn(3, 4)),
    ):
        path = save_denoiser(tmp_path / f"{type(denoiser.network).__name__}.pt", denoiser)
        loaded = load_denoiser(path)
        assert type(loaded.network) is type(denoiser.network)
        mask = (torch.rand(x.shape, generator=torch.Generator().manual_seed(1)) > 0.3).float()
        sigma = torch.tensor([0.1, 1.0, 5.0])
        torch.testing.assert_close(
            masked_denoise(loaded, x, sigma, mask),
            masked_denoise(denoiser, x, sigma, mask),
            rtol=0,
            atol=0,
        )


# --------------------------------------------------------------------------------------------
# AmbientLoss


def test_ambient_loss_is_the_weighted_error_on_the_observed_entries(device):
    """The loss against a direct evaluation: the same further mask from the same generator, the
    error averaged over the originally observed entries, the dsm weight; the values of the data
    at its missing entries never matter."""
    denoiser = small_masked_unet().to(device)
    g = torch.Generator().manual_seed(0)
    masks = (torch.rand(6, 1, 8, 8, generator=g) > 0.4).float()
    data = (masks * torch.randn(6, 1, 8, 8, generator=g)).to(device)
    index = torch.tensor([4, 0, 4])
    sigma = torch.tensor([0.05, 0.5, 3.0], device=device)
    noise = torch.randn(3, 1, 8, 8, generator=g).to(device)
    loss = AmbientLoss(masks, delta=0.3)

    def step_generator() -> torch.Generator:
        return torch.Generator(device=device).manual_seed(5)

    value = loss(denoiser, data[index], sigma, noise, index, step_generator())
    keep = (torch.rand(3, 1, 8, 8, generator=step_generator(), device=device) >= 0.3).float()
    m, x = masks[index].to(device), data[index]
    estimate = masked_denoise(denoiser, x + sigma[:, None, None, None] * noise, sigma, m * keep)
    expected = (1 / sigma**2 + 4) * (m * (estimate - x)).pow(2).sum((1, 2, 3)) / m.sum((1, 2, 3))
    assert value.device == data.device
    torch.testing.assert_close(value, expected)
    filled = data[index] + (1 - m) * 7.0
    torch.testing.assert_close(loss(denoiser, filled, sigma, noise, index, step_generator()), value)


def test_ambient_loss_decreases_on_a_tiny_set():
    """Training a small masked U-Net for 60 steps: the loss of a fixed batch (fixed levels, noise
    and further masks) falls below 75% of its value at initialisation (measured over seeds: 55%
    to 63%)."""
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 8), torch.linspace(-1, 1, 8), indexing="ij")
    phase = torch.rand(16, 1, 1, 1, generator=g) * 2 * math.pi
    images = 0.5 * torch.sin(3 * xx + phase) * torch.cos(2 * yy)[None, None]
    masks = (torch.rand(16, 1, 8, 8, generator=g) > 0.3).float()
    loss = AmbientLoss(masks, delta=0.2)
    index = torch.arange(16)
    sigma = torch.logspace(-1.5, 0.5, 16)
    noise = torch.randn(16, 1, 8, 8, generator=g)

    def fixed(denoiser: PreconditionedDenoiser) -> float:
        with torch.no_grad():
            return (
                loss(
                    denoiser, masks * images, sigma, noise, index, torch.Generator().manual_seed(3)
                )
                .mean()
                .item()
            )

    denoiser = small_masked_unet()
    before = fixed(denoiser)
    config = TrainConfig(steps=60, batch_size=16, lr=1e-2, ema_decay=0.0, progress=False)
    result = train(
        denoiser, masks * images, config, generator=torch.Generator().manual_seed(1), loss=loss
    )
    assert fixed(result.denoiser) < 0.75 * before


def test_trained_ambient_network_approaches_the_gaussian_posterior_mean():
    """A 4-D Gaussian seen through random masks (40% missing), trained with delta = 0.2: the
    network's estimate of E[x | M~ x_t, M~] (exact by Gaussian conditioning on the kept entries)
    has an excess risk below 10% of the Bayes risk at every level (measured over seeds and
    covariances: 2% to 6.5% at 800 steps). On the erased entries, at the levels where the kept
    ones are informative, its excess is below 35% of that of the estimator that puts the prior
    mean 0 there (measured: 10% to 23%): the network infers the entries it is not shown."""
    d, p, delta = 4, 0.4, 0.2
    cov, chol = gaussian(d)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, d, generator=g) @ chol.T
    masks = (torch.rand(4096, d, generator=g) >= p).float()
    torch.manual_seed(0)
    denoiser = PreconditionedDenoiser(MaskedMLP(d, hidden=(128, 128)), sigma_data=0.5)
    config = TrainConfig(steps=800, batch_size=256, lr=3e-3, ema_decay=0.99, progress=False)
    result = train(
        denoiser,
        masks * x,
        config,
        generator=torch.Generator().manual_seed(1),
        loss=AmbientLoss(masks, delta),
    )

    n = 20_000
    for s in (0.1, 0.3, 1.0):
        x0 = torch.randn(n, d, generator=g) @ chol.T
        further = (torch.rand(n, d, generator=g) >= p).float() * (
            torch.rand(n, d, generator=g) >= delta
        ).float()
        sigma = torch.full((n,), s)
        x_t = x0 + s * torch.randn(n, d, generator=g)
        exact = posterior_mean(cov, x_t, sigma, further)
        with torch.no_grad():
            estimate = masked_denoise(result.denoiser, x_t, sigma, further)
        bayes = (exact - x0).pow(2).sum(1).mean()
        excess = (estimate - exact).pow(2).sum(1).mean()
        assert excess < 0.1 * bayes, f"sigma={s}: excess {excess:.4f}, Bayes risk {bayes:.4f}"
        if s < 1:
            erased = ((1 - further) * (estimate - exact)).pow(2).sum(1).mean()
            blind = ((1 - further) * exact).pow(2).sum(1).mean()
            assert erased < 0.35 * blind, (
                f"sigma={s}: erased-entry excess {erased:.4f}, prior-mean excess {blind:.4f}"
            )


# --------------------------------------------------------------------------------------------
# AmbientDenoiser


class MaskEcho(nn.Module):
    """A mask-conditioned stand-in network that returns its mask: D(0, sigma) = c_out M."""

    mask_conditioned = True

    def forward(self, x: Tensor, c_noise: Tensor, mask: Tensor | None = None) -> Tensor:
        return torch.ones_like(x) if mask is None else mask.expand_as(x)


def test_ambient_denoiser_draws_fresh_masks_of_the_training_law():
    """With x_t = 0 the estimate is c_out times the average of the drawn masks: their kept
    fraction is 1 - delta within 4 binomial standard errors, consecutive calls differ, the same
    seed repeats them, and K draws give multiples of 1/K."""
    denoiser = PreconditionedDenoiser(MaskEcho(), sigma_data=0.5)
    sigma = torch.tensor(1.0)
    c_out = 0.5 / math.sqrt(1.25)
    zeros = torch.zeros(100, 1, 16, 16)
    sampler = AmbientDenoiser(denoiser, delta=0.3, generator=torch.Generator().manual_seed(0))
    first, second = sampler(zeros, sigma) / c_out, sampler(zeros, sigma) / c_out
    n = first.numel()
    assert abs(first.mean().item() - 0.7) < 4 * math.sqrt(0.7 * 0.3 / n)
    assert torch.allclose(first, first.round(), atol=1e-5) and not torch.equal(first, second)
    again = AmbientDenoiser(denoiser, delta=0.3, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(again(zeros, sigma) / c_out, first)
    averaged = AmbientDenoiser(
        denoiser, delta=0.3, generator=torch.Generator().manual_seed(1), draws=4
    )(zeros, sigma)
    assert torch.allclose(4 * averaged / c_out, (4 * averaged / c_out).round(), atol=1e-4)
    assert abs((averaged / c_out).mean().item() - 0.7) < 4 * math.sqrt(0.7 * 0.3 / (4 * n))


def test_fixed_mask_denoiser_keeps_one_mask_per_row():
    """With x_t = 0 the estimate is c_out times the row's mask: the kept fraction is ``keep``
    within 4 binomial standard errors, every call returns the same masks (one per trajectory),
    rows differ, the seed repeats them, and keep = 1 is the denoiser with every entry shown."""
    denoiser = PreconditionedDenoiser(MaskEcho(), sigma_data=0.5)
    sigma = torch.tensor(1.0)
    c_out = 0.5 / math.sqrt(1.25)
    zeros = torch.zeros(100, 1, 16, 16)
    fixed = FixedMaskDenoiser(denoiser, keep=0.4, seed=3)
    first = fixed(zeros, sigma) / c_out
    n = first.numel()
    assert abs(first.mean().item() - 0.4) < 4 * math.sqrt(0.4 * 0.6 / n)
    assert torch.allclose(first, first.round(), atol=1e-5)
    torch.testing.assert_close(fixed(zeros, 0.3 * sigma) / (0.5 * 0.3 / math.sqrt(0.34)), first)
    assert not torch.equal(first[0], first[1])
    torch.testing.assert_close(FixedMaskDenoiser(denoiser, keep=0.4, seed=3)(zeros, sigma) / c_out, first)
    assert not torch.equal(FixedMaskDenoiser(denoiser, keep=0.4, seed=4)(zeros, sigma) / c_out, first)
    torch.manual_seed(0)
    mlp = PreconditionedDenoiser(MaskedMLP(6, hidden=(16,)), sigma_data=0.5)
    x_t = torch.randn(5, 6)
    torch.testing.assert_close(FixedMaskDenoiser(mlp, keep=1.0)(x_t, sigma), mlp(x_t, sigma))
    with pytest.raises(ValueError, match="keep"):
        FixedMaskDenoiser(denoiser, keep=0.0)
    with pytest.raises(TypeError, match="does not take a mask"):
        FixedMaskDenoiser(PreconditionedDenoiser(MLP(6)), keep=0.5)


# --------------------------------------------------------------------------------------------
# Noisy data


def test_noisy_conversion_is_exact_on_a_gaussian():
    """For x ~ N(mu, Sigma) and y = x + sigma_y n, E[y | x_t] at level sigma is the denoiser of
    N(mu, Sigma + sigma_y^2 I) at level sqrt(sigma^2 - sigma_y^2); converted, it is E[x | x_t]
    to rounding, at every level above the floor, and the floor's estimate below."""
    sigma_y, d = 0.3, 5
    cov, _ = gaussian(d, seed=1, dtype=torch.float64)
    mu = torch.linspace(-0.5, 0.5, d, dtype=torch.float64)[None]
    clean = GaussianMixture(torch.ones(1, dtype=torch.float64), mu, cov[None])
    noisy = GaussianMixture(
        torch.ones(1, dtype=torch.float64),
        mu,
        (cov + sigma_y**2 * torch.eye(d, dtype=torch.float64))[None],
    )

    def e_y(x_t: Tensor, sigma: Tensor) -> Tensor:
        return noisy.denoiser(x_t, torch.sqrt(sigma**2 - sigma_y**2))

    converted = AmbientNoisyDenoiser(e_y, sigma_y)
    sigma = torch.tensor([0.34, 0.5, 1.0, 3.0, 30.0], dtype=torch.float64)
    x_t = torch.randn(5, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(converted(x_t, sigma), clean.denoiser(x_t, sigma), rtol=0, atol=1e-5)
    assert converted.floor == pytest.approx(1.1 * sigma_y)
    low = torch.tensor([0.01, 0.2, 0.3, 0.3, 0.33], dtype=torch.float64)
    torch.testing.assert_close(converted(x_t, low), clean.denoiser(x_t, 0.33), rtol=0, atol=1e-5)


def test_noisy_loss_has_the_exact_expectation_at_the_true_denoiser():
    """With h = E[y | x_t] exact, the loss's mean over many draws is w(sigma) tr Cov[y | x_t] / n,
    Cov[y | x_t] = C_y - C_y (Sigma + sigma^2 I)^-1 C_y with C_y = Sigma + sigma_y^2 I, at the
    total level sigma = sqrt(sigma_y^2 + s^2) (within 4 standard errors); a shifted h does worse."""
    sigma_y, d, n = 0.3, 4, 40_000
    cov, chol = gaussian(d, seed=2, dtype=torch.float64)
    eye = torch.eye(d, dtype=torch.float64)
    noisy = GaussianMixture(
        torch.ones(1, dtype=torch.float64),
        torch.zeros(1, d, dtype=torch.float64),
        (cov + sigma_y**2 * eye)[None],
    )

    class Exact(nn.Module):
        sigma_data = 0.5

        def __init__(self, shift: float) -> None:
            super().__init__()
            self.shift = shift

        def forward(self, x_t: Tensor, sigma: Tensor) -> Tensor:
            return noisy.denoiser(x_t, torch.sqrt(sigma**2 - sigma_y**2)) + self.shift

    g = torch.Generator().manual_seed(0)
    y = torch.randn(n, d, generator=g, dtype=torch.float64) @ chol.T + sigma_y * torch.randn(
        n, d, generator=g, dtype=torch.float64
    )
    s = 0.4
    sigma, noise = (
        torch.full((n,), s, dtype=torch.float64),
        torch.randn(n, d, generator=g, dtype=torch.float64),
    )
    loss = AmbientNoisyLoss(sigma_y)
    values = loss(Exact(0.0), y, sigma, noise, torch.arange(n), None).double()
    total2 = sigma_y**2 + s**2
    c_y = cov + sigma_y**2 * eye
    expected = (
        (1 / total2 + 4) * (c_y - c_y @ torch.linalg.solve(cov + total2 * eye, c_y)).trace() / d
    )
    assert abs(values.mean() - expected) < 4 * values.std() / math.sqrt(n)
    assert loss(Exact(0.05), y, sigma, noise, torch.arange(n), None).mean() > values.mean()


# --------------------------------------------------------------------------------------------
# Validation


def test_bad_inputs_are_refused():
    masks = torch.ones(4, 1, 8, 8)
    for delta in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="delta"):
            AmbientLoss(masks, delta=delta)
    with pytest.raises(ValueError, match="only 0 and 1"):
        AmbientLoss(0.5 * masks)
    with pytest.raises(ValueError, match=r"masks must have shape \(N"):
        AmbientLoss(torch.ones(8))
    loss = AmbientLoss(masks)
    denoiser = small_masked_unet()
    with pytest.raises(
        ValueError, match=r"items have shape \(1, 4, 4\) but the masks have shape \(1, 8, 8\)"
    ):
        loss(
            denoiser,
            torch.zeros(2, 1, 4, 4),
            torch.ones(2),
            torch.zeros(2, 1, 4, 4),
            torch.tensor([0, 1]),
            None,
        )
    with pytest.raises(ValueError, match="index must lie in"):
        loss(
            denoiser,
            torch.zeros(2, 1, 8, 8),
            torch.ones(2),
            torch.zeros(2, 1, 8, 8),
            torch.tensor([0, 4]),
            None,
        )
    plain = PreconditionedDenoiser(MLP(4, hidden=(8,)))
    with pytest.raises(TypeError, match="does not take a mask"):
        AmbientDenoiser(plain, delta=0.1)
    with pytest.raises(ValueError, match="delta"):
        AmbientDenoiser(denoiser, delta=1.0)
    with pytest.raises(ValueError, match="draws"):
        AmbientDenoiser(denoiser, delta=0.1, draws=0)
    with pytest.raises(ValueError, match="noise_std"):
        AmbientNoisyLoss(0.0)
    with pytest.raises(ValueError, match="floor"):
        AmbientNoisyDenoiser(plain, 0.2, floor=0.2)
    with pytest.raises(ValueError, match="in_channels"):
        MaskedUNet(0)
