"""``fit``: every learning method in the one loop of rounds, with its start, resume and errors."""

import json
import math
import statistics

import pytest
import torch

from cleanprior.data.files import Observations
from cleanprior.data.synthetic import manifold_prior
from cleanprior.diffusion.training import TrainConfig
from cleanprior.learning.em import EMConfig, EvalConfig
from cleanprior.learning.fit import LEARNING_METHODS, fit
from cleanprior.operators import Blur, Mask, gaussian_kernel, random_mask
from cleanprior.runs.checkpoint import load_checkpoint
from cleanprior.runs.prior import NetworkConfig

NOISE_STD = 0.05


def masked_manifold(n: int = 2048, seed: int = 0) -> Observations:
    """DiEM's 1-D manifold in 5-D, each observation with 40 % of its coordinates missing."""
    truth = manifold_prior(features=5)
    g = torch.Generator().manual_seed(seed)
    x = truth.sample(n, g)
    A = Mask(random_mask((5,), 0.4, batch=n, generator=g))
    y = A(x) + NOISE_STD * torch.randn(n, 5, generator=g)
    return Observations(y=y, operator=A, noise_std=NOISE_STD, shape=(5,), x=x)


def options(rounds: int = 1, steps: int = 600, device: torch.device | str = "cpu", **changes) -> dict:
    # the tests of what a method learns take the `device` fixture; those that compare two runs
    # bit for bit stay on the CPU, where every kernel is deterministic
    return dict(
        device=device,
        network=NetworkConfig(hidden=(64, 64)),
        config=EMConfig(**{"rounds": rounds, "steps": 32, "batch_size": 256, "heldout": 64, "gaussian_iterations": 32,
                           "zetas": (0.1, 0.3, 1.0), **changes}),
        training=TrainConfig(steps=steps, batch_size=256, lr=3e-3, ema_decay=0.95, checkpoint_every=100, progress=False),
        evaluation=EvalConfig(prior_samples=1024, posterior_samples=2, steps=16),
        progress=False,
    )


def test_emdiffusion_first_round_improves_a_start_from_another_dataset(tmp_path, device):
    """EMDiffusion may start from clean data of another distribution (the paper's cross-dataset
    start): here 256 points of another random manifold. One EM round on the observations must
    pull the prior most of the way towards the truth (measured: Sinkhorn 0.746 -> 0.385), and the
    DPS step size it chose must be the candidate whose held-out check was nearest 1."""
    clean = manifold_prior(features=5, seed=1).sample(256, torch.Generator().manual_seed(5))
    result = fit(masked_manifold(), tmp_path / "run", method="emdiffusion", init_clean=clean, **options(device=device))
    start, first = result.metrics
    assert first["sinkhorn"] < 0.7 * start["sinkhorn"], (start["sinkhorn"], first["sinkhorn"])
    tuned = json.loads((tmp_path / "run" / "rounds" / "01" / "zeta.json").read_text())
    nearest = min(tuned["ppc"], key=lambda z: abs(math.log(tuned["ppc"][z])))
    assert first["dps_zeta"] == tuned["zeta"] == float(nearest)
    # the DPS samples explain the held-out data far better than the worst candidate
    assert tuned["ppc"][nearest] < 0.2 * max(tuned["ppc"].values())


def test_the_clean_bound_beats_the_naive_bound_and_the_loss_decreases(tmp_path, device):
    observations = masked_manifold()
    clean = fit(observations, tmp_path / "clean", method="clean", **options(device=device)).metrics
    naive = fit(observations, tmp_path / "naive", method="naive", **options(device=device)).metrics
    # the masked coordinates read as zeros: a prior of zero-filled vectors is far from the manifold
    assert clean[0]["round"] == naive[0]["round"] == 1  # no start: the first row is round 1
    assert clean[0]["sinkhorn"] < 0.25 * naive[0]["sinkhorn"], (clean[0]["sinkhorn"], naive[0]["sinkhorn"])
    losses = load_checkpoint(tmp_path / "clean" / "train.pt")["training"]["history"]["loss"]
    assert sum(losses[-50:]) < 0.7 * sum(losses[:50])


def test_a_direct_run_killed_and_resumed_equals_one_run(tmp_path, monkeypatch):
    """Killed after its first round's training (in the evaluation), a baseline run resumes and
    ends with the same weights as an uninterrupted one: one schedule over all rounds, one optimiser."""
    import cleanprior.learning.evaluation as evaluation

    observations = masked_manifold(512)
    fit(observations, tmp_path / "once", method="naive", **options(rounds=2, steps=40, heldout=16))
    original = evaluation.evaluate_round

    def dies(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluation, "evaluate_round", dies)
    with pytest.raises(KeyboardInterrupt):
        fit(observations, tmp_path / "twice", method="naive", **options(rounds=2, steps=40, heldout=16))
    monkeypatch.setattr(evaluation, "evaluate_round", original)
    fit(observations, tmp_path / "twice", method="naive", resume=True, **options(rounds=2, steps=40, heldout=16))
    a = load_checkpoint(tmp_path / "once" / "rounds" / "02" / "denoiser.pt")["state_dict"]
    b = load_checkpoint(tmp_path / "twice" / "rounds" / "02" / "denoiser.pt")["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = json.loads((tmp_path / "twice" / "metrics.json").read_text())
    assert [r["round"] for r in rows] == [1, 2]


def test_a_posterior_method_name_means_diem_with_that_e_step(tmp_path, device):
    fit(masked_manifold(256), tmp_path / "run", method="dps", **options(rounds=0, heldout=16, device=device))
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["method"] == "diem" and saved["em"]["posterior"] == "dps"


@pytest.mark.parametrize(
    "method, change, message",
    [
        ("nonsense", {}, "unknown learning method"),
        ("emdiffusion", {}, "clean images"),
        ("clean", {"x": None}, "no 'x'"),
        ("emdiffusion", {"init_clean": torch.zeros(8, 3)}, "shape"),
    ],
)
def test_bad_requests_are_refused_before_any_work(tmp_path, method, change, message):
    observations = masked_manifold(128)
    init_clean = change.pop("init_clean", None)
    if "x" in change:
        observations = Observations(y=observations.y, operator=observations.operator, noise_std=NOISE_STD, shape=(5,))
    with pytest.raises(ValueError, match=message):
        fit(observations, tmp_path / "run", method=method, init_clean=init_clean, **options(heldout=16))
    assert not (tmp_path / "run").exists()
    assert set(LEARNING_METHODS) >= {"diem", "emdiffusion", "flowdiff", "ambient", "sure", "naive", "clean"}


def noisy_manifold(n: int = 2048, noise_std: float = 0.2, seed: int = 0) -> Observations:
    """The manifold's points with Gaussian noise (the identity operator: denoising)."""
    from cleanprior.operators import Identity

    g = torch.Generator().manual_seed(seed)
    x = manifold_prior(features=5).sample(n, g)
    return Observations(y=x + noise_std * torch.randn(x.shape, generator=g), operator=Identity(), noise_std=noise_std,
                        shape=(5,), x=x)


@pytest.mark.parametrize(
    "method, task, ratio",
    # measured Sinkhorn to the truth after one round, against the naive prior's:
    # ambient on masks 0.17 vs 0.31; ambient (noisy form) 0.10 vs 0.14; SURE 0.070 vs 0.14
    [("ambient", "mask", 0.75), ("ambient", "noise", 0.9), ("sure", "noise", 0.7)],
)
def test_corruption_aware_baselines_beat_the_naive_prior(tmp_path, method, task, ratio, device):
    observations = masked_manifold() if task == "mask" else noisy_manifold()
    learned = fit(observations, tmp_path / method, method=method, **options(device=device)).metrics[-1]
    naive = fit(observations, tmp_path / "naive", method="naive", **options(device=device)).metrics[-1]
    assert learned["sinkhorn"] < ratio * naive["sinkhorn"], (learned["sinkhorn"], naive["sinkhorn"])
    losses = load_checkpoint(tmp_path / method / "train.pt")["training"]["history"]["loss"]
    # medians: SURE's one-probe divergence makes single losses heavy-tailed (the sum of 50 swings
    # from -2 to 45 between seeds; the median falls from about 0.9 to 0.5 on every seed tried)
    assert statistics.median(losses[-50:]) < statistics.median(losses[:50])
    # a prior learned from noisy data is sampled through its wrapper wherever the run is loaded
    from cleanprior.runs.prior import load_run_prior

    loaded = load_run_prior(tmp_path / method)
    expected = {"mask": "PreconditionedDenoiser", "noise": {"ambient": "AmbientNoisyDenoiser", "sure": "SUREDenoiser"}}
    assert type(loaded).__name__ == (expected["mask"] if task == "mask" else expected["noise"][method])


@pytest.mark.parametrize("method", ["ambient", "sure"])
def test_baselines_refuse_operators_they_cannot_learn_from(tmp_path, method):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1, 8, 8, generator=g)
    A = Blur(gaussian_kernel(1.0, size=5))
    observations = Observations(y=A(x), operator=A, noise_std=0.01, shape=(1, 8, 8), x=x)
    with pytest.raises(ValueError, match="not from the operator 'blur'"):
        fit(observations, tmp_path / "run", method=method, **options(heldout=8))
    assert not (tmp_path / "run").exists()


def test_flowdiff_learns_a_prior_and_an_amortized_posterior(tmp_path, device):
    """Two rounds of 300 joint steps on the masked manifold (measured: Sinkhorn 0.19 then 0.106,
    naive 0.31; the flow's one-pass posterior mean has RMSE 0.171, MMPS with the learned prior
    0.162): the second round improves on the first, the prior beats the naive one, the one-pass
    posterior is nearly as good as posterior sampling, and the flow's loss decreases."""
    from cleanprior.learning.flowdiff import FlowDiffConfig

    observations = masked_manifold()
    flow = FlowDiffConfig(batch_size=256, hidden=64, layers=4, ema_decay=0.95)
    result = fit(observations, tmp_path / "run", method="flowdiff", flow=flow, **options(rounds=2, steps=300, device=device))
    first, second = result.metrics
    naive = fit(observations, tmp_path / "naive", method="naive", **options(device=device)).metrics[-1]
    assert second["sinkhorn"] < 0.8 * first["sinkhorn"], (first["sinkhorn"], second["sinkhorn"])
    assert second["sinkhorn"] < 0.6 * naive["sinkhorn"], (second["sinkhorn"], naive["sinkhorn"])
    assert second["amortized_rmse"] < 1.3 * second["rmse_mean"]
    losses = result.method.model.losses["flow"]
    assert sum(losses[-50:]) < sum(losses[:50])
    assert (tmp_path / "run" / "rounds" / "02" / "flowdiff.pt").exists()


def test_flowdiff_resumed_round_by_round_equals_one_run(tmp_path):
    """FlowDiff's draws at step s come from (seed, s) and its optimisers have no schedule: a run
    grown from 1 to 2 rounds on resume ends with the weights of a 2-round run."""
    from cleanprior.learning.flowdiff import FlowDiffConfig

    observations = masked_manifold(256)
    flow = FlowDiffConfig(batch_size=32, hidden=16, layers=2)
    fit(observations, tmp_path / "once", method="flowdiff", flow=flow, **options(rounds=2, steps=10, heldout=16))
    fit(observations, tmp_path / "twice", method="flowdiff", flow=flow, **options(rounds=1, steps=10, heldout=16))
    fit(observations, tmp_path / "twice", method="flowdiff", flow=flow, resume=True,
        **options(rounds=2, steps=10, heldout=16))
    a = load_checkpoint(tmp_path / "once" / "flowdiff.pt", keys=("flow", "step"))
    b = load_checkpoint(tmp_path / "twice" / "flowdiff.pt", keys=("flow", "step"))
    assert a["step"] == b["step"] == 20
    assert all(torch.equal(a["flow"][k], b["flow"][k]) for k in a["flow"])
    assert all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"])


def test_emdiffusion_grown_on_resume_equals_one_run_and_its_start_loss_decreases(tmp_path):
    """The start (RUN/init.pt), each round's chosen step size (zeta.json), E-step batches and
    M-step checkpoints are all kept: a run grown from 1 to 2 rounds equals a 2-round run."""
    clean = manifold_prior(features=5, seed=1).sample(64, torch.Generator().manual_seed(5))
    observations = masked_manifold(512)
    small = dict(steps=40, heldout=16, tune_observations=8)
    fit(observations, tmp_path / "once", method="emdiffusion", init_clean=clean, **options(rounds=2, **small))
    fit(observations, tmp_path / "twice", method="emdiffusion", init_clean=clean, **options(rounds=1, **small))
    fit(observations, tmp_path / "twice", method="emdiffusion", init_clean=clean, resume=True,
        **options(rounds=2, **small))
    a = load_checkpoint(tmp_path / "once" / "rounds" / "02" / "train.pt")
    b = load_checkpoint(tmp_path / "twice" / "rounds" / "02" / "train.pt")
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    losses = load_checkpoint(tmp_path / "once" / "init.pt")["training"]["history"]["loss"]
    assert sum(losses[-10:]) < sum(losses[:10])


def test_a_run_without_held_out_observations_samples_its_prior_on_its_device(tmp_path, device):
    """With no held-out observations the evaluation's prior samples are drawn where the prior is."""
    result = fit(masked_manifold(256), tmp_path / "run", method="naive", **options(steps=20, heldout=0, device=device))
    assert [row["round"] for row in result.metrics] == [1]
    assert next(result.prior.parameters()).device.type == device.type
