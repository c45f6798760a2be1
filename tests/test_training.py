import math

import pytest
import torch

from cleanprior import (
    GaussianMixture,
    PreconditionedDenoiser,
    TrainConfig,
    load_denoiser,
    sample_prior,
    train,
)
from cleanprior.diffusion.training import dsm_loss, sample_sigma
from cleanprior.metrics import sliced_wasserstein
from cleanprior.nn import MLP


def small_denoiser(d=2, seed=0):
    torch.manual_seed(seed)
    return PreconditionedDenoiser(MLP(d, hidden=(64, 64)), sigma_data=0.5)


def test_exact_denoiser_minimises_the_dsm_loss():
    """E[x | x_t] minimises the denoising loss: the exact mixture denoiser beats a perturbed one."""
    gm = GaussianMixture.isotropic(torch.tensor([[-0.5, 0.0], [0.5, 0.3]]), 0.1)

    class Wrap(PreconditionedDenoiser):
        def __init__(self, shift):
            torch.nn.Module.__init__(self)
            self.sigma_data, self.shift = 0.5, shift

        def forward(self, x_t, sigma):
            return gm.denoiser(x_t, sigma) + self.shift

    g = torch.Generator().manual_seed(0)
    x = gm.sample(50_000, g)
    sigma = sample_sigma(TrainConfig(), 50_000, g)
    exact = dsm_loss(Wrap(0.0), x, sigma, torch.Generator().manual_seed(1)).mean()
    shifted = dsm_loss(Wrap(0.05), x, sigma, torch.Generator().manual_seed(1)).mean()
    assert exact < shifted


def test_noise_level_laws():
    g = torch.Generator().manual_seed(0)
    log_sigma = sample_sigma(TrainConfig(p_mean=-1.0, p_std=0.5), 100_000, g).log()
    assert log_sigma.mean().item() == pytest.approx(-1.0, abs=0.01)
    assert log_sigma.std().item() == pytest.approx(0.5, abs=0.01)
    config = TrainConfig(noise="schedule", t_alpha=2.0, t_beta=5.0, sigma_min=0.01, sigma_max=10.0)
    sigma = sample_sigma(config, 100_000, g)
    t = (sigma.double().log() - math.log(0.01)) / (math.log(10.0) - math.log(0.01))
    assert t.mean().item() == pytest.approx(2 / 7, abs=0.005)  # the Beta(2, 5) mean
    assert sigma.min() >= 0.01 * (1 - 1e-6) and sigma.max() <= 10.0 * (1 + 1e-6)


def test_learning_rate_schedules():
    cosine = TrainConfig(steps=100, warmup=10)
    assert cosine.lr_factor(0) == pytest.approx(0.1)
    assert cosine.lr_factor(10) == pytest.approx(1.0)
    assert cosine.lr_factor(55) == pytest.approx(0.5, abs=1e-12)
    assert TrainConfig(steps=100, lr_schedule="linear").lr_factor(50) == pytest.approx(0.5)
    assert TrainConfig(steps=100, lr_schedule="constant").lr_factor(99) == 1.0
    with pytest.raises(ValueError, match="lr_schedule"):
        TrainConfig(lr_schedule="step")


@pytest.mark.slow
def test_trained_mlp_reproduces_a_mixture_far_better_than_a_gaussian():
    """DSM training on a 5-component 2-D mixture: the learned prior lands within 2x the exact-vs-exact
    sliced Wasserstein floor, and below 40% of the distance of the best Gaussian fit."""
    means = 0.8 * torch.tensor([[-1.0, -1.0], [1.0, 1.0], [-1.0, 1.0], [1.0, -1.0], [0.0, 0.0]])
    gm = GaussianMixture.isotropic(means, 0.1)
    data = gm.sample(4096, torch.Generator().manual_seed(0))
    n = 2000
    reference = gm.sample(n, torch.Generator().manual_seed(5))
    projections = lambda: torch.Generator().manual_seed(9)  # noqa: E731
    floor = sliced_wasserstein(gm.sample(n, torch.Generator().manual_seed(6)), reference, generator=projections())
    g = torch.Generator().manual_seed(3)
    gaussian = data.mean(0) + torch.randn(n, 2, generator=g) @ torch.linalg.cholesky(torch.cov(data.T)).T
    gaussian_sw = sliced_wasserstein(gaussian, reference, generator=projections())

    denoiser = PreconditionedDenoiser(MLP(2, hidden=(128, 128, 128)), sigma_data=0.5)
    result = train(denoiser, data, TrainConfig(steps=1000, batch_size=256, lr=3e-3, ema_decay=0.99, progress=False),
                   generator=torch.Generator().manual_seed(1))
    assert sum(result.losses[-100:]) < 0.8 * sum(result.losses[:100])
    x = sample_prior(result.denoiser, n, shape=(2,), sampler="heun", steps=32, generator=g)
    sw = sliced_wasserstein(x, reference, generator=projections())
    assert sw < 2.0 * floor, (sw, floor)
    assert sw < 0.4 * gaussian_sw, (sw, gaussian_sw)


def test_resume_continues_exactly(tmp_path, device):
    """A run stopped between checkpoints and resumed ends with the same weights as one uninterrupted
    run, with its minibatches, levels and noise drawn on the training device."""
    data = torch.randn(256, 3, device=device)
    config = TrainConfig(steps=20, batch_size=32, checkpoint_every=5, log_every=3, progress=False, ema_decay=0.9)

    def run(seed: int, path: str, **kwargs):
        return train(small_denoiser(3, seed=seed).to(device), data, config,
                     generator=torch.Generator(device).manual_seed(0), checkpoint=tmp_path / path, **kwargs)

    full = run(0, "full.pt")

    class Stop(Exception):
        pass

    def kill_at_12(step, loss):
        if step == 12:
            raise Stop

    with pytest.raises(Stop):
        run(0, "run.pt", callback=kill_at_12)
    assert load_denoiser(tmp_path / "run.pt").metadata["step"] == 10
    resumed = run(123, "run.pt", resume=True)
    assert resumed.losses == full.losses
    for a, b in zip(resumed.denoiser.state_dict().values(), full.denoiser.state_dict().values()):
        assert torch.equal(a, b)
    saved = load_denoiser(tmp_path / "run.pt", device=device)
    x = torch.randn(4, 3, device=device)
    assert torch.equal(saved(x, 0.3), full.denoiser(x, 0.3))


def test_non_finite_training_keeps_the_last_good_checkpoint(tmp_path, device):
    """A learning rate that blows the weights up stops the run at a read with the checkpoint of the
    last good state in place (finite weights), never the weights that produced the failure."""
    data = torch.randn(128, 3, device=device)
    config = TrainConfig(steps=40, batch_size=16, checkpoint_every=4, log_every=2, progress=False, lr=3e6,
                         clip=0, lr_schedule="constant", warmup=40)
    with pytest.raises(FloatingPointError, match="non-finite"):
        train(small_denoiser(3).to(device), data, config, generator=torch.Generator(device).manual_seed(0),
              checkpoint=tmp_path / "run.pt")
    saved = load_denoiser(tmp_path / "run.pt")
    assert 0 < saved.metadata["step"] < 40
    assert all(torch.isfinite(v).all() for v in saved.state_dict().values())


def test_ema_tracks_the_weights():
    data = torch.randn(64, 2)
    denoiser = small_denoiser()
    before = [p.detach().clone() for p in denoiser.parameters()]
    result = train(denoiser, data, TrainConfig(steps=5, batch_size=8, ema_decay=0.5, progress=False),
                   generator=torch.Generator().manual_seed(0))
    # with decay 0.5 over 5 steps, the EMA lies strictly between the start and the final weights
    ema = list(result.denoiser.parameters())
    moved = [(e - b).abs().sum() for e, b in zip(ema, before)]
    behind = [(e - p).abs().sum() for e, p in zip(ema, denoiser.parameters())]
    assert sum(moved) > 0 and sum(behind) > 0


def test_bfloat16_autocast_trains():
    data = 0.5 * torch.randn(512, 4)
    with pytest.warns(UserWarning, match="amp=True on a CPU"):
            result = train(small_denoiser(4), data, TrainConfig(steps=60, batch_size=64, amp=True, lr=3e-3, progress=False),
                       generator=torch.Generator().manual_seed(0))
    assert all(math.isfinite(v) for v in result.losses)
    assert sum(result.losses[-10:]) < sum(result.losses[:10])


def test_bad_training_data_are_refused(tmp_path):
    with pytest.raises(ValueError, match="NaN"):
        train(small_denoiser(), torch.full((8, 2), math.nan), TrainConfig(steps=1, progress=False))
    with pytest.raises(ValueError, match="shape"):
        train(small_denoiser(), torch.zeros(8, 3), TrainConfig(steps=1, progress=False))
    with pytest.raises(ValueError, match="N > 0"):
        train(small_denoiser(), torch.zeros(0, 2), TrainConfig(steps=1, progress=False))
    with pytest.raises(ValueError, match="steps"):
        TrainConfig(steps=0)


def test_training_runs_where_the_denoiser_is(device):
    denoiser = small_denoiser(2).to(device)
    result = train(denoiser, torch.randn(64, 2), TrainConfig(steps=3, batch_size=8, progress=False),
                   generator=torch.Generator().manual_seed(0))
    assert next(result.denoiser.parameters()).device.type == device.type
    x = sample_prior(result.denoiser, 4, shape=(2,), steps=4)
    assert x.device.type == device.type


def test_training_in_chunks_equals_training_in_one_go(tmp_path):
    """``until`` stops at a step with a checkpoint; resuming chunk by chunk ends where one run ends."""
    data = torch.randn(128, 3)
    config = TrainConfig(steps=12, batch_size=16, checkpoint_every=100, progress=False, ema_decay=0.9, lr_schedule="cosine")
    full = train(small_denoiser(3), data, config, generator=torch.Generator().manual_seed(0))
    for until in (5, 9, 12):
        chunked = train(small_denoiser(3), data, config, generator=torch.Generator().manual_seed(0),
                        checkpoint=tmp_path / "run.pt", resume=True, until=until)
        assert len(chunked.losses) == until
    assert chunked.losses == full.losses
    for a, b in zip(chunked.denoiser.state_dict().values(), full.denoiser.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="until"):
        train(small_denoiser(3), data, config, until=13)


def test_a_custom_loss_replaces_denoising_score_matching():
    """With a loss whose optimum is known (a denoiser that outputs x + 1), training reaches it.

    The loss regresses ``D(x + sigma eps, sigma)`` onto ``x + 1``: its minimiser is
    ``E[x | x_t] + 1``; at a low noise level ``E[x | x_t]`` is ``x_t`` up to ``sigma^2``, so the
    trained denoiser must output about ``x_t + 1``, which plain score matching never would.
    The loss also sees the rows' indices and the run's generator on the training device (on one
    process; under torchrun a per-step one), whose draws move on from step to step.
    """
    seen = []

    def shifted(denoiser, x, sigma, noise, index, generator):
        seen.append((index.clone(), generator.device.type))
        target = x + 1
        error = denoiser(x + sigma[:, None] * noise, sigma) - target
        return error.pow(2).mean(1) / sigma**2

    data = torch.randn(512, 2)
    config = TrainConfig(steps=300, batch_size=64, lr=3e-3, progress=False, ema_decay=0.9, noise="lognormal",
                         p_mean=-3.0, p_std=0.3)
    result = train(small_denoiser(2), data, config, generator=torch.Generator().manual_seed(0), loss=shifted)
    x = torch.randn(256, 2)
    with torch.no_grad():
        out = result.denoiser(x, torch.full((256,), 0.05))
    assert (out - x - 1).abs().mean() < 0.1
    assert all(len(i) == 64 and i.max() < 512 for i, _ in seen)
    assert {d for _, d in seen} == {"cpu"}
    assert len({tuple(i.tolist()) for i, _ in seen}) == len(seen)  # the draws move on every step
