"""DiEM expectation-maximization: a round improves the prior, runs resume, torchrun agrees."""

import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch

from cleanprior.data.files import Observations, save_observations
from cleanprior.data.synthetic import manifold_prior
from cleanprior.diffusion.training import TrainConfig
from cleanprior.learning.em import EMConfig, EvalConfig, fit_em
from cleanprior.operators import Matrix, random_projection
from cleanprior.runs.prior import NetworkConfig

NOISE_STD = 0.05


def manifold_observations(n: int, seed: int = 0) -> tuple[Observations, object]:
    """DiEM's low-dimensional task: a random 1-D manifold in 5-D, random 2x5 projections."""
    prior = manifold_prior(features=5)
    g = torch.Generator().manual_seed(seed)
    x = prior.sample(n, g)
    A = random_projection(2, 5, batch=n, generator=g)
    y = Matrix(A)(x) + NOISE_STD * torch.randn(n, 2, generator=g)
    return Observations(y=y, operator=Matrix(A), noise_std=NOISE_STD, shape=(5,), x=x), prior


def small(rounds: int = 1, **changes) -> dict:
    return dict(
        network=NetworkConfig(hidden=(64, 64)),
        config=EMConfig(**{"rounds": rounds, "steps": 16, "batch_size": 256, "heldout": 64, "gaussian_iterations": 32,
                           **changes}),
        training=TrainConfig(steps=600, batch_size=256, lr=3e-3, ema_decay=0.95, checkpoint_every=100, progress=False),
        evaluation=EvalConfig(prior_samples=1024, posterior_samples=2, steps=16),
        progress=False,
    )


def folder_digest(path) -> dict[str, str]:
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*")) if p.is_file()
    }


def test_one_round_on_the_manifold_lowers_the_sinkhorn_divergence(tmp_path):
    observations, _ = manifold_observations(2048)
    result = fit_em(observations, tmp_path / "run", **small(rounds=1))
    start, first = result.metrics
    assert start["round"] == 0 and first["round"] == 1
    # the exact evidence of the Gaussian start is recorded; the network prior must be closer to
    # the manifold than the Gaussian it started from
    assert "log_evidence" in start
    # measured: 0.227 -> 0.172 (0.76x), and 0.119 after a second round
    assert first["sinkhorn"] < 0.8 * start["sinkhorn"], (start["sinkhorn"], first["sinkhorn"])
    # the posterior predictive check is near its ideal 1 for a prior that explains the data
    assert 0.3 < first["ppc"] < 3.0
    run = tmp_path / "run"
    for name in ("config.json", "state.json", "gaussian.pt", "checkpoint.pt", "report.html", "metrics.png",
                 "rounds/01/samples.png"):
        assert (run / name).exists(), name
    assert json.loads((run / "state.json").read_text())["rounds"] == 1


def test_an_interrupted_round_resumes_without_redoing_finished_work(tmp_path, monkeypatch):
    observations, _ = manifold_observations(1088)
    run = tmp_path / "run"
    options = small(rounds=2)
    calls = {"n": 0}
    import cleanprior.posterior.api as api

    real = api.sample_posterior

    def crashing(*args, **kwargs):
        calls["n"] += 1
        # call 1 is round 1's held-out evaluation; calls 2-5 are round 2's E-step batches
        if calls["n"] == 4:  # the third batch of round 2: the process dies
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(api, "sample_posterior", crashing)
    with pytest.raises(KeyboardInterrupt):
        fit_em(observations, run, **options)
    state = json.loads((run / "state.json").read_text())
    assert state["rounds"] == 1
    done = sorted(p.name for p in (run / "rounds/02/estep").glob("batch_*.pt"))
    assert done == ["batch_00000.pt", "batch_00001.pt"]

    # a fresh start in the same folder is refused, and touches nothing
    before = folder_digest(run)
    with pytest.raises(FileExistsError, match="resume"):
        fit_em(observations, run, **options)
    assert folder_digest(run) == before

    calls["n"] = -100
    result = fit_em(observations, run, resume=True, **options)
    assert [row["round"] for row in result.metrics] == [0, 1, 2]
    # the two finished batches were kept: only the remaining 2 of 4 batches were sampled
    assert calls["n"] == -100 + 2 + 1  # + 1 for the held-out evaluation of round 2
    assert json.loads((run / "state.json").read_text())["rounds"] == 2

    # rounds may grow on resume; other options may not change
    with pytest.raises(ValueError, match="em"):
        fit_em(observations, run, resume=True, **small(rounds=3, steps=8))


def test_torchrun_with_two_processes_gives_the_single_process_e_step(tmp_path):
    observations, _ = manifold_observations(576)
    path = tmp_path / "obs.npz"
    save_observations(path, observations)
    common = ["fit", str(path), "--rounds", "1", "--steps", "8", "--batch_size", "128", "--heldout", "64",
              "--gaussian_iterations", "8", "--network.hidden", "[32,32]", "--training.steps", "20",
              "--training.batch_size", "64", "--training.progress", "false", "--evaluation.prior_samples", "64"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "-m", "cleanprior.cli", *common, "-o", str(tmp_path / "one")], check=True, env=env,
                   capture_output=True, timeout=600)
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
         "-m", "cleanprior.cli", *common, "-o", str(tmp_path / "two")],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for run in ("one", "two"):
        assert json.loads((tmp_path / run / "state.json").read_text())["rounds"] == 1
    from cleanprior.runs.checkpoint import load_checkpoint

    batches = sorted((tmp_path / "one/rounds/01/estep").glob("batch_*.pt"))
    assert len(batches) == 4
    for batch in batches:
        one = load_checkpoint(batch, keys=("samples",))["samples"]
        two = load_checkpoint(tmp_path / "two/rounds/01/estep" / batch.name, keys=("samples",))["samples"]
        torch.testing.assert_close(one, two)
    # data-parallel training took the same minibatches: same weights up to summation order
    one = load_checkpoint(tmp_path / "one/checkpoint.pt")["state_dict"]
    two = load_checkpoint(tmp_path / "two/checkpoint.pt")["state_dict"]
    for key in one:
        torch.testing.assert_close(one[key], two[key], rtol=1e-4, atol=1e-5)


def test_a_run_folder_from_before_an_option_existed_still_resumes(tmp_path):
    """Options added later count as their defaults in an older config.json; the E-step's method was
    first recorded as ``method``. Another value of an old option is still refused."""
    observations, _ = manifold_observations(256)
    options = small(rounds=0)
    options["config"].heldout = 16
    fit_em(observations, tmp_path / "run", **options)
    path = tmp_path / "run" / "config.json"
    saved = json.loads(path.read_text())
    saved["em"]["method"] = saved["em"].pop("posterior")
    for key in ("zetas", "tune_observations", "delta"):
        saved["em"].pop(key)
    saved.pop("options")
    path.write_text(json.dumps(saved))
    fit_em(observations, tmp_path / "run", resume=True, **options)
    saved["em"]["method"] = "dps"
    path.write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="em configuration differs"):
        fit_em(observations, tmp_path / "run", resume=True, **options)


def test_a_batch_size_left_to_the_device_keeps_the_cpus_batches_and_its_first_choice(tmp_path):
    """EMConfig.batch_size = 0: on the CPU, batches of 256 observations as before; a size recorded
    beside an E-step's batches (a GPU's choice) is the one a resumed E-step uses, since each batch
    has its own generator; a run recorded with a size resumes under the automatic default with it."""
    from cleanprior.learning.em import posterior_batches
    from cleanprior.learning.gaussian import GaussianPrior

    observations, _ = manifold_observations(300)
    prior = GaussianPrior.standard((5,))

    def draw(batch_size, folder=None):
        return posterior_batches(prior, observations, config=EMConfig(batch_size=batch_size), samples=2,
                                 seed_keys=(3, 1), folder=folder, exact=True, distribute=False)

    assert torch.equal(draw(0), draw(256))
    assert not torch.equal(draw(0), draw(7))
    folder = tmp_path / "estep"
    folder.mkdir()
    (folder / "batch_size.json").write_text(json.dumps({"batch_size": 7}))
    assert torch.equal(draw(0, folder), draw(7))
    assert len(list(folder.glob("batch_*.pt"))) == 43  # ceil(300 / 7)
    with pytest.raises(ValueError, match="batch_size"):
        EMConfig(batch_size=-1)

    options = small(rounds=0, batch_size=128, heldout=16)
    fit_em(observations, tmp_path / "run", **options)
    options["config"].batch_size = 0
    fit_em(observations, tmp_path / "run", resume=True, **options)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["em"]["batch_size"] == 128


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the batch size is measured on a GPU")
def test_a_gpu_batch_size_fits_its_free_memory():
    from cleanprior.learning.em import estep_batch_size
    from cleanprior.learning.gaussian import GaussianPrior

    observations, _ = manifold_observations(300)
    observations = observations.to("cuda")
    prior = GaussianPrior.standard((5,)).to("cuda")
    size = estep_batch_size(prior, observations, EMConfig(), samples=2, exact=True)
    assert 1 <= size <= len(observations)
