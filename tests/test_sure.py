"""Tests of Stein's unbiased risk estimate and of SURE-based score training."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import Tensor, nn

from cleanprior.diffusion.precondition import PreconditionedDenoiser
from cleanprior.diffusion.training import TrainConfig, train
from cleanprior.learning.sure import SUREDenoiser, SURELoss, divergence, sure
from cleanprior.nn import MLP

F64 = torch.float64


def gaussian(d: int, seed: int = 0, dtype: torch.dtype = F64) -> tuple[Tensor, Tensor]:
    """A correlated zero-mean Gaussian of average variance 0.25: covariance, Cholesky factor."""
    g = torch.Generator().manual_seed(seed)
    L = torch.randn(d, d, generator=g, dtype=dtype)
    cov = L @ L.T + 0.1 * torch.eye(d, dtype=dtype)
    cov = cov * (0.25 * d / cov.trace())
    return cov, torch.linalg.cholesky(cov)


def test_divergence_of_a_linear_map_matches_its_trace():
    """For F(y) = W y each probe gives b^T W b: mean tr W, variance 2 ||(W + W^T)/2||_F^2, which
    K probes divide by K. The mean over n samples lies within 4 standard errors of tr W, and the
    empirical variances within 10% of the formula (about 4 of their own standard errors)."""
    d, n = 6, 40_000
    g = torch.Generator().manual_seed(0)
    W = torch.randn(d, d, generator=g, dtype=F64)
    y = torch.randn(n, d, generator=g, dtype=F64)
    variance = 2 * (0.5 * (W + W.T)).pow(2).sum()
    for probes in (1, 4):
        div = divergence(lambda z: z @ W.T, y, g, probes=probes)
        assert div.shape == (n,)
        assert abs(div.mean() - W.trace()) < 4 * math.sqrt(variance / probes / n)
        assert div.var().item() == pytest.approx((variance / probes).item(), rel=0.1)


def test_divergence_of_a_nonlinear_map_with_the_default_step():
    """F = tanh entrywise: div F(y) = sum_j (1 - tanh^2 y_j). The Monte-Carlo estimate with the
    data-scaled step matches the exact divergence of every sample on average, within 4 standard
    errors of the paired difference (the O(epsilon) bias is far smaller)."""
    n, shape = 20_000, (2, 3, 3)
    g = torch.Generator().manual_seed(1)
    y = 2 * torch.randn(n, *shape, generator=g, dtype=F64)
    exact = (1 - torch.tanh(y) ** 2).flatten(1).sum(1)
    difference = divergence(torch.tanh, y, g) - exact
    assert abs(difference.mean()) < 4 * difference.std() / math.sqrt(n)


@pytest.mark.parametrize("per_entry", [False, True])
def test_sure_matches_the_true_error_of_a_linear_denoiser(per_entry):
    """x ~ N(0, Sigma), y = x + sigma n, F(y) = W y with a random W: the true risk is
    tr((W - I) Sigma (W - I)^T) + sigma^2 ||W||_F^2. With two noise levels in one batch, the mean
    SURE of each half lies within 4 standard errors of its risk (SURE's own spread estimates the
    standard error), and so does the mean paired difference with the realised errors."""
    d, n = 5, 40_000
    cov, chol = gaussian(d)
    g = torch.Generator().manual_seed(2)
    W = 0.3 * torch.randn(d, d, generator=g, dtype=F64) + 0.5 * torch.eye(d, dtype=F64)
    levels = torch.cat(
        [torch.full((n // 2,), 0.2, dtype=F64), torch.full((n // 2,), 0.7, dtype=F64)]
    )
    x = torch.randn(n, d, generator=g, dtype=F64) @ chol.T
    y = x + levels[:, None] * torch.randn(n, d, generator=g, dtype=F64)
    estimate = sure(lambda z: z @ W.T, y, levels, g, per_entry=per_entry)
    realised = (y @ W.T - x).pow(2).sum(1) / (d if per_entry else 1)
    eye = torch.eye(d, dtype=F64)
    for half, sigma in ((slice(None, n // 2), 0.2), (slice(n // 2, None), 0.7)):
        risk = ((W - eye) @ cov @ (W - eye).T).trace() + sigma**2 * W.pow(2).sum()
        risk = risk / (d if per_entry else 1)
        e, paired = estimate[half], estimate[half] - realised[half]
        assert abs(e.mean() - risk) < 4 * e.std() / math.sqrt(e.numel())
        assert abs(paired.mean()) < 4 * paired.std() / math.sqrt(e.numel())


def test_sure_loss_has_the_exact_expectation_at_the_true_denoiser(device):
    """With the exact Gaussian denoiser D = Sigma (Sigma + sigma^2 I)^-1 y_t, the loss's mean is
    w(sigma) tr(Sigma - Sigma (Sigma + sigma^2 I)^-1 Sigma) / n at the total level
    sigma = sqrt(sigma_y^2 + s^2), within 4 standard errors, for per-item noise levels too."""
    d, n = 4, 40_000
    cov, chol = gaussian(d, seed=3)
    eye = torch.eye(d, dtype=F64)

    class Exact(nn.Module):
        sigma_data = 0.5

        def forward(self, x_t: Tensor, sigma: Tensor) -> Tensor:
            system = cov.to(device) + sigma[:, None, None] ** 2 * eye.to(device)
            gains = torch.linalg.solve(system, cov.to(device).expand(len(sigma), d, d))
            return (x_t[:, None, :] @ gains)[:, 0]

    g = torch.Generator().manual_seed(4)
    sigma_y = torch.where(torch.arange(n) % 2 == 0, 0.2, 0.5).double()
    x = torch.randn(n, d, generator=g, dtype=F64) @ chol.T
    y = (x + sigma_y[:, None] * torch.randn(n, d, generator=g, dtype=F64)).to(device)
    s = torch.full((n,), 0.3, dtype=F64, device=device)
    noise = torch.randn(n, d, generator=g, dtype=F64).to(device)
    probes = torch.Generator(device=device).manual_seed(5)
    values = SURELoss(sigma_y)(Exact(), y, s, noise, torch.arange(n), probes).double().cpu()
    for parity, noise_std in ((0, 0.2), (1, 0.5)):
        total2 = noise_std**2 + 0.3**2
        bayes = (cov - cov @ torch.linalg.solve(cov + total2 * eye, cov)).trace()
        v = values[parity::2]
        assert abs(v.mean() - (1 / total2 + 4) * bayes / d) < 4 * v.std() / math.sqrt(v.numel())


def test_sure_training_recovers_the_gaussian_denoiser():
    """Noisy samples (sigma_y = 0.4) of a 4-D Gaussian only. After 300 steps of SURE training,
    at levels 0.45 to 1 the excess risk over the exact denoiser is below 6% of the Bayes risk
    (measured over seeds and covariances: 0.7% to 4.4%); at 0.45 and 0.6 it is below 30% of the
    excess of the denoiser of the noisy data, the answer of training on y as if it were clean
    (measured: 9% to 16%). The loss of a fixed batch falls below 85% of its value at
    initialisation (measured: 46% to 74%)."""
    d, sigma_y = 4, 0.4
    cov, chol = gaussian(d, dtype=torch.float32)
    eye = torch.eye(d)
    g = torch.Generator().manual_seed(0)
    y = torch.randn(4096, d, generator=g) @ chol.T + sigma_y * torch.randn(4096, d, generator=g)
    torch.manual_seed(0)
    denoiser = PreconditionedDenoiser(MLP(d, hidden=(128, 128)), sigma_data=0.5)
    initial = copy.deepcopy(denoiser)
    loss = SURELoss(sigma_y)
    config = TrainConfig(steps=300, batch_size=256, lr=3e-3, ema_decay=0.99, progress=False)
    result = train(denoiser, y, config, generator=torch.Generator().manual_seed(1), loss=loss)

    n = 20_000
    for s in (0.45, 0.6, 1.0):
        x0 = torch.randn(n, d, generator=g) @ chol.T
        x_t = x0 + s * torch.randn(n, d, generator=g)
        exact = x_t @ torch.linalg.solve(cov + s**2 * eye, cov)
        with torch.no_grad():
            estimate = result.denoiser(x_t, torch.full((n,), s))
        bayes = (exact - x0).pow(2).sum(1).mean()
        excess = (estimate - exact).pow(2).sum(1).mean()
        # the minimiser of clean-data training on y: the denoiser of N(0, Sigma + sigma_y^2 I)
        gap = torch.linalg.solve(
            cov + (sigma_y**2 + s**2) * eye, cov + sigma_y**2 * eye
        ) - torch.linalg.solve(cov + s**2 * eye, cov)
        naive = (gap.T @ (cov + s**2 * eye) @ gap).trace()
        assert excess < 0.06 * bayes, f"sigma={s}: excess {excess:.5f}, Bayes risk {bayes:.4f}"
        if s < 1:
            assert excess < 0.3 * naive, (
                f"sigma={s}: excess {excess:.5f}, noisy-data denoiser's {naive:.4f}"
            )

    batch = torch.arange(1024)
    levels = torch.logspace(-1.5, 0.5, 1024)
    noise = torch.randn(1024, d, generator=g)

    def fixed(model: PreconditionedDenoiser) -> float:
        with torch.no_grad():
            return (
                loss(model, y[batch], levels, noise, batch, torch.Generator().manual_seed(9))
                .mean()
                .item()
            )

    assert fixed(result.denoiser) < 0.85 * fixed(initial)


def test_sure_denoiser_clamps_levels_below_the_data_noise():
    seen: list[Tensor] = []

    def record(x_t: Tensor, sigma: Tensor) -> Tensor:
        seen.append(sigma)
        return x_t

    SUREDenoiser(record, 0.3)(torch.zeros(4, 2), torch.tensor([0.01, 0.3, 0.5, 2.0]))
    torch.testing.assert_close(seen[0], torch.tensor([0.3, 0.3, 0.5, 2.0]))


def test_bad_inputs_are_refused():
    y = torch.randn(3, 4)
    with pytest.raises(ValueError, match="noise_std must be positive"):
        sure(lambda z: z, y, -0.1)
    with pytest.raises(
        ValueError, match=r"noise_std must be a float or one value per sample \(3,\)"
    ):
        sure(lambda z: z, y, torch.ones(2))
    with pytest.raises(ValueError, match="probes"):
        divergence(lambda z: z, y, probes=0)
    with pytest.raises(ValueError, match="epsilon must be positive"):
        divergence(lambda z: z, y, epsilon=0.0)
    with pytest.raises(ValueError, match="same shape"):
        divergence(lambda z: z[:, :2], y)
    with pytest.raises(ValueError, match="noise_std"):
        SURELoss(torch.tensor([0.1, 0.0]))
    with pytest.raises(ValueError, match="probes"):
        SURELoss(0.1, probes=0)
    with pytest.raises(ValueError, match="noise_std"):
        SUREDenoiser(lambda x, s: x, 0.0)
    loss = SURELoss(torch.full((5,), 0.1))
    denoiser = PreconditionedDenoiser(MLP(4, hidden=(8,)))
    with pytest.raises(ValueError, match=r"index must lie in \[0, 5\)"):
        loss(denoiser, y, torch.ones(3), torch.zeros(3, 4), torch.tensor([0, 1, 5]), None)


def test_sure_trained_denoiser_reaches_the_wiener_filter():
    """Noisy samples of a 4-D Gaussian N(0, Sigma) only (sigma = 0.4) and a linear F: SURE's
    minimiser is the Wiener filter W = Sigma (Sigma + sigma^2 I)^-1, whose error per entry is
    sigma^2 tr(W) / d = 0.53 sigma^2 here, against sigma^2 for the noisy input. After 300 steps
    the held-out error is within 2% of the filter's on the same samples (measured 0.3% to 0.5%
    over 4 covariances and seeds)."""
    from cleanprior.learning.sure import SUREConfig, train_sure_denoiser

    d, sigma = 4, 0.4
    cov, chol = gaussian(d, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    y = torch.randn(4096, d, generator=g) @ chol.T + sigma * torch.randn(4096, d, generator=g)
    torch.manual_seed(0)
    net = nn.Linear(d, d)
    config = SUREConfig(steps=300, batch_size=256, lr=0.03, clip=0)
    result = train_sure_denoiser(
        net, y, sigma, config, generator=torch.Generator().manual_seed(0), progress=False
    )
    assert result.network is net and not net.training and len(result.losses) == 300
    x = torch.randn(50_000, d, generator=g) @ chol.T
    y_test = x + sigma * torch.randn(50_000, d, generator=g)
    wiener = torch.linalg.solve(cov + sigma**2 * torch.eye(d), cov)  # symmetric: W = W^T
    with torch.no_grad():
        error = (net(y_test) - x).pow(2).mean()
    best = (y_test @ wiener - x).pow(2).mean()
    assert best < 0.6 * sigma**2
    assert error < 1.02 * best


def test_sure_training_resume_continues_exactly(tmp_path):
    """Stopped at a checkpoint and resumed (per-image noise levels, two probes), the run ends
    with the losses and weights of an uninterrupted one; other options or levels are refused."""
    from cleanprior.learning.sure import SUREConfig, train_sure_denoiser
    from cleanprior.runs.checkpoint import load_checkpoint

    g = torch.Generator().manual_seed(1)
    y = torch.randn(64, 3, generator=g)
    levels = 0.1 + torch.rand(64, generator=g)
    config = SUREConfig(steps=10, batch_size=8, lr=0.01, probes=2, checkpoint_every=4)

    def fresh(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Linear(3, 3)

    full = train_sure_denoiser(
        fresh(0), y, levels, config, generator=torch.Generator().manual_seed(0), progress=False
    )

    class Stop(Exception):
        pass

    def kill_at_6(step: int, loss: float) -> None:
        if step == 6:
            raise Stop

    with pytest.raises(Stop):
        train_sure_denoiser(
            fresh(0),
            y,
            levels,
            config,
            generator=torch.Generator().manual_seed(0),
            checkpoint=tmp_path / "run.pt",
            callback=kill_at_6,
            progress=False,
        )
    assert load_checkpoint(tmp_path / "run.pt", keys=("training",))["training"]["step"] == 4
    resumed = train_sure_denoiser(
        fresh(5),
        y,
        levels,
        config,
        generator=torch.Generator().manual_seed(3),
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
        train_sure_denoiser(
            fresh(0),
            y,
            levels,
            SUREConfig(steps=10, batch_size=4),
            checkpoint=tmp_path / "run.pt",
            resume=True,
            progress=False,
        )
    with pytest.raises(ValueError, match="another noise_std"):
        train_sure_denoiser(
            fresh(0), y, 0.3, config, checkpoint=tmp_path / "run.pt", resume=True, progress=False
        )


def test_train_sure_denoiser_refuses_bad_input():
    from cleanprior.learning.sure import SUREConfig, train_sure_denoiser

    net = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="NaN"):
        train_sure_denoiser(net, torch.full((4, 2), float("nan")), 0.1, progress=False)
    with pytest.raises(ValueError, match="noise_std must be positive"):
        train_sure_denoiser(net, torch.zeros(4, 2), 0.0, progress=False)
    with pytest.raises(ValueError, match=r"one value per image \(4,\)"):
        train_sure_denoiser(net, torch.zeros(4, 2), torch.ones(3), progress=False)
    with pytest.raises(ValueError, match="no parameters"):
        train_sure_denoiser(nn.Identity(), torch.zeros(4, 2), 0.1, progress=False)
    with pytest.raises(ValueError, match="maps an input of shape"):
        train_sure_denoiser(nn.Linear(2, 3), torch.zeros(4, 2), 0.1, progress=False)
    with pytest.raises(ValueError, match="probes"):
        SUREConfig(probes=0)
    with pytest.raises(ValueError, match="epsilon"):
        SUREConfig(epsilon=0.0)
