"""Tests of reconstruction runs: fit, reload, apply, resume and the command functions."""

from __future__ import annotations

import copy
import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from cleanprior.data import digits
from cleanprior.data.files import Observations, corrupt_dataset
from cleanprior.diffusion.precondition import PreconditionedDenoiser
from cleanprior.learning.noise2score import ScoreConfig
from cleanprior.learning.recon import (
    METHODS,
    ReconConfig,
    Residual,
    apply_command,
    apply_reconstruction,
    fit_reconstruction,
    load_reconstruction,
    recon_command,
)
from cleanprior.learning.rounds import round_generator
from cleanprior.learning.sud import SUDConfig
from cleanprior.learning.sure import SUREConfig
from cleanprior.metrics.image import psnr
from cleanprior.nn import UNet
from cleanprior.operators.registry import operator
from cleanprior.runs.checkpoint import save_denoiser

SIGMA = 0.2
PAIRED = ("supervised", "sud", "sud2")


def tiny(method: str, **options) -> ReconConfig:
    """A few steps of a two-level U-Net of 8 and 16 channels on 8x8 digits."""
    options = {"heldout": 16, **options}
    return ReconConfig(
        method=method,
        channels=(8, 16),
        sud=SUDConfig(steps=3, batch_paired=4, batch_unpaired=8, sud2_steps=2, checkpoint_every=2),
        score=ScoreConfig(steps=3, batch_size=8, checkpoint_every=2),
        sure=SUREConfig(steps=3, batch_size=8, checkpoint_every=2),
        **options,
    )


@pytest.fixture(scope="module")
def data():
    """64 digits with Gaussian noise (std 0.2), 8 clean pairs, and a small untrained prior."""
    x = digits("train")[:72]
    observations = corrupt_dataset(
        x[:64], "identity", noise_std=SIGMA, generator=torch.Generator().manual_seed(0)
    )
    pairs = (
        x[64:],
        x[64:] + SIGMA * torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(1)),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        prior = PreconditionedDenoiser(UNet(1, channels=(8, 16), blocks=1)).eval()
    return observations, pairs, prior


def fit(data, run, method, device="cpu", **options):
    observations, pairs, prior = data
    return fit_reconstruction(
        observations,
        run,
        config=options.pop("config", None) or tiny(method),
        pairs=pairs if method in PAIRED else None,
        prior=copy.deepcopy(prior).to(device) if method in ("sud", "sud2") else None,
        progress=False,
        device=device,
        **options,
    )


@pytest.mark.parametrize("method", METHODS)
def test_each_method_runs_end_to_end_and_reloads(tmp_path, data, method, device):
    """Every file of the run is written; the reloaded map is the trained one; the metrics are
    those of the map on the held-out draw. The input's PSNR is that of noise of std 0.2 on a
    range of 2, 10 log10(4 / 0.04) = 20 dB: a 64-pixel image's MSE is sigma^2 chi2_64 / 64, so
    its PSNR has a standard deviation of (10 / ln 10) sqrt(2 / 64) = 0.77 dB, 0.19 dB for the
    mean of 16 images, and a bias of 0.07 dB; 0.6 dB is three standard deviations."""
    observations = data[0]
    result = fit(data, tmp_path / "run", method, device=device)
    run = tmp_path / "run"
    for name in (
        "config.json",
        "train.pt",
        "model.pt",
        "metrics.json",
        "reconstructions.png",
        "loss.png",
        "report.html",
    ):
        assert (run / name).is_file(), name
    settings = json.loads((run / "config.json").read_text())
    assert settings["config"]["method"] == method
    # resolved: the noise level of the file, the residual form where it applies
    assert settings["config"]["noise_std"] == (SIGMA if method in ("noise2score", "sure") else 0.0)
    assert settings["config"]["residual"] is (method != "noise2score")
    assert settings["config"]["sud"]["method"] == (method if method in PAIRED else "sud2")

    model = load_reconstruction(run, device=device)
    y = observations.y.to(device)
    with torch.no_grad():
        assert torch.equal(model(y), result.network(y))
        inner = model.network(y)
    if method == "noise2score":
        torch.testing.assert_close(model(y), y + SIGMA**2 * inner, rtol=0, atol=1e-6)
    else:
        assert isinstance(model, Residual)
        torch.testing.assert_close(model(y), y + inner, rtol=0, atol=0)

    rows = torch.randperm(len(observations), generator=round_generator(0, 1))[:16]
    heldout = observations.subset(rows)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["heldout"] == 16 and metrics["steps"] == 3
    assert metrics["psnr"] == pytest.approx(
        float(psnr(apply_reconstruction(model, heldout.y), heldout.x).mean()), abs=1e-5
    )
    assert metrics["psnr_input"] == pytest.approx(
        float(psnr(heldout.y, heldout.x).mean()), abs=1e-5
    )
    assert abs(metrics["psnr_input"] - 20 * math.log10(2 / SIGMA)) < 0.6
    assert 0 < metrics["seconds_per_image"] < 1


@pytest.mark.parametrize("method", ["noise2score", "sure"])
def test_a_batch_is_reconstructed_in_one_forward_pass(tmp_path, data, method):
    """Noise2Score's Tweedie estimate and the residual map both call the U-Net once per batch."""
    y = data[0].y[:40]
    fit(data, tmp_path / "run", method)
    model = load_reconstruction(tmp_path / "run")
    calls = []
    model.network.register_forward_hook(lambda module, inputs, output: calls.append(len(inputs[0])))
    whole = apply_reconstruction(model, y, batch_size=64)
    assert calls == [40]
    batched = apply_reconstruction(model, y, batch_size=16)
    assert calls == [40, 16, 16, 8]
    torch.testing.assert_close(batched, whole, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="trained on observations of shape"):
        apply_reconstruction(model, torch.zeros(2, 1, 16, 16))


def test_noise2score_uses_the_poisson_tweedie_formula(tmp_path):
    """y = gain * Poisson(x / gain): the reconstruction is (y + gain / 2) exp(gain R(y))."""
    x = (digits("train")[:32] + 1) / 2
    gain = 0.1
    y = gain * torch.poisson(x / gain, generator=torch.Generator().manual_seed(0))
    observations = Observations(
        y=y, operator=operator("identity"), noise_std=0.0, shape=(1, 8, 8), x=x
    )
    config = tiny("noise2score", noise="poisson", gain=gain, data_range=1.0, heldout=8)
    result = fit_reconstruction(observations, tmp_path / "run", config=config, progress=False)
    with torch.no_grad():
        expected = (y + gain / 2) * torch.exp(gain * result.network.network(y))
        torch.testing.assert_close(load_reconstruction(tmp_path / "run")(y), expected)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["config"]["gain"] == gain


def test_bad_inputs_are_refused_before_anything_is_written(tmp_path, data):
    observations, pairs, prior = data
    run = tmp_path / "run"
    cases = [
        ("needs pairs", {"config": tiny("supervised")}),
        ("needs a prior", {"config": tiny("sud"), "pairs": pairs}),
        ("takes no pairs", {"config": tiny("sure"), "pairs": pairs}),
        ("takes no prior", {"config": tiny("supervised"), "pairs": pairs, "prior": prior}),
        (
            "pairs' x contains NaN",
            {"config": tiny("sud2"), "pairs": (pairs[0] / 0, pairs[1]), "prior": prior},
        ),
        (
            "pairs hold 8 images x but 4",
            {"config": tiny("supervised"), "pairs": (pairs[0], pairs[1][:4])},
        ),
        (
            "pairs' observations have shape",
            {"config": tiny("supervised"), "pairs": (pairs[0], pairs[1][..., :4, :4])},
        ),
        ("takes Gaussian noise", {"config": tiny("sure", noise="gamma", shape=4.0)}),
        ("needs its gain", {"config": tiny("noise2score", noise="poisson")}),
        ("must be non-negative", {"config": tiny("noise2score", noise="poisson", gain=0.1)}),
        ("leaves no observation", {"config": dataclasses.replace(tiny("sure"), heldout=64)}),
        ("not divisible", {"config": dataclasses.replace(tiny("sure"), channels=(4, 4, 4, 4, 4))}),
    ]
    for message, options in cases:
        with pytest.raises(ValueError, match=message):
            fit_reconstruction(observations, run, progress=False, **options)
        assert not run.exists(), message
    y_only = Observations(
        y=observations.y, operator=operator("identity"), noise_std=0.0, shape=(1, 8, 8)
    )
    with pytest.raises(ValueError, match="needs the Gaussian noise level"):
        fit_reconstruction(y_only, run, config=tiny("noise2score"), progress=False)
    assert not run.exists()

    fit(data, run, "sure")
    before = (run / "model.pt").read_bytes()
    with pytest.raises(FileExistsError, match="already holds a run"):
        fit(data, run, "sure")
    with pytest.raises(ValueError, match="its config configuration differs"):
        fit(
            data,
            run,
            "sure",
            config=dataclasses.replace(tiny("sure"), channels=(8, 8)),
            resume=True,
        )
    assert (run / "model.pt").read_bytes() == before
    with pytest.raises(ValueError, match="method must be one of"):
        ReconConfig(method="cyclegan")
    with pytest.raises(ValueError, match="noise_std must be a non-negative"):
        ReconConfig(noise_std=-1.0)


@pytest.mark.parametrize("method", ["sud2", "sure"])
def test_resume_after_an_interruption_equals_an_uninterrupted_run(
    tmp_path, data, monkeypatch, method
):
    """Killed after step 4 of 6 (checkpoints every 2 steps) and resumed: the same weights,
    losses and metrics as one run."""
    import cleanprior.learning.sud as sud_module
    import cleanprior.learning.sure as sure_module

    config = tiny(method)
    config = dataclasses.replace(
        config,
        sud=dataclasses.replace(config.sud, steps=6, ema_decay=0.5),
        sure=dataclasses.replace(config.sure, steps=6),
    )
    full = fit(data, tmp_path / "full", method, config=config)

    class Stop(Exception):
        pass

    def stop_at_4(step: int, loss: float) -> None:
        if step == 4:
            raise Stop

    module, name = (
        (sud_module, "train_reconstruction")
        if method == "sud2"
        else (sure_module, "train_sure_denoiser")
    )
    original = getattr(module, name)
    monkeypatch.setattr(
        module, name, lambda *args, **kwargs: original(*args, callback=stop_at_4, **kwargs)
    )
    with pytest.raises(Stop):
        fit(data, tmp_path / "run", method, config=config)
    monkeypatch.setattr(module, name, original)
    assert not (tmp_path / "run" / "model.pt").exists()
    with pytest.raises(FileExistsError):
        fit(data, tmp_path / "run", method, config=config)
    resumed = fit(data, tmp_path / "run", method, config=config, resume=True)
    assert resumed.metrics["history"] == full.metrics["history"]
    for key in ("psnr", "ssim", "final_loss"):
        assert resumed.metrics[key] == full.metrics[key]
    a = load_reconstruction(tmp_path / "run").state_dict()
    b = load_reconstruction(tmp_path / "full").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_commands_read_files_train_and_apply(tmp_path, data, capsys, device):
    """A file with y (and x) only, a pairs file and a prior run folder: recon then apply."""
    observations, pairs, prior = data
    obs_path, pairs_path = tmp_path / "obs.npz", tmp_path / "pairs.npz"
    np.savez(obs_path, y=observations.y.numpy(), x=observations.x.numpy())
    np.savez(pairs_path, x=pairs[0].numpy(), y=pairs[1].numpy())
    save_denoiser(tmp_path / "prior" / "checkpoint.pt", prior)
    config = tiny("sud")
    result = recon_command(
        str(obs_path),
        str(tmp_path / "run"),
        method="sud",
        pairs=str(pairs_path),
        prior=str(tmp_path / "prior"),
        config=config,
        device=device,
    )
    assert "psnr" in result.metrics and "wrote" in capsys.readouterr().out
    apply_command(str(tmp_path / "run"), str(obs_path), str(tmp_path / "out.npz"), batch_size=10, device=device)
    with np.load(tmp_path / "out.npz") as file:
        written = torch.from_numpy(file["x"])
    with torch.no_grad():
        # batches of 10 against one of 64: the same map, up to the convolutions' summation order
        # (GPUs convolve in TF32 by default: 10 bits of mantissa)
        expected = load_reconstruction(tmp_path / "run", device=device)(observations.y.to(device)).cpu()
        torch.testing.assert_close(written, expected, rtol=0, atol=1e-6 if device.type == "cpu" else 1e-3)

    recon_command(
        str(obs_path), str(tmp_path / "sure"), method="sure", noise_std=SIGMA, config=tiny("sure")
    )
    assert (
        json.loads((tmp_path / "sure" / "config.json").read_text())["config"]["noise_std"] == SIGMA
    )
    bad = tmp_path / "bad.npz"
    np.savez(bad, y=np.full((4, 1, 8, 8), np.nan, dtype=np.float32))
    with pytest.raises(ValueError, match="'y' contains 256 NaN"):
        recon_command(str(bad), str(tmp_path / "never"), method="sure", noise_std=SIGMA)
    np.savez(bad, x=observations.x.numpy())
    with pytest.raises(ValueError, match="no observations under the key 'y'"):
        apply_command(str(tmp_path / "run"), str(bad), str(tmp_path / "never.npz"))
    with pytest.raises(ValueError, match="needs pairs"):
        recon_command(str(obs_path), str(tmp_path / "never"), method="supervised")
    assert not (tmp_path / "never").exists() and not (tmp_path / "never.npz").exists()


def test_config_round_trips_through_plain_data():
    config = tiny("sud", noise="gamma", shape=8.0, rate=4.0)
    assert ReconConfig.from_dict(json.loads(json.dumps(dataclasses.asdict(config)))) == config
    assert config.noise_parameters() == {"shape": 8.0, "rate": 4.0}
    with pytest.raises(ValueError, match="unknown ReconConfig fields: colour"):
        ReconConfig.from_dict({"colour": 1})
    with pytest.raises(ValueError, match="unknown SUDConfig fields: lambda_3"):
        ReconConfig.from_dict({"sud": {"lambda_3": 1.0}})


@pytest.mark.parametrize("method", ["sud2", "noise2score"])
def test_runs_train_on_every_device(tmp_path, data, device, method):
    """The network and the prior on the device, the data and the reconstructions where they were."""
    observations, pairs, prior = data
    result = fit_reconstruction(
        observations,
        tmp_path / "run",
        config=tiny(method),
        pairs=pairs if method == "sud2" else None,
        prior=copy.deepcopy(prior).to(device) if method == "sud2" else None,
        progress=False,
        device=device,
    )
    assert next(result.network.parameters()).device.type == device.type
    model = load_reconstruction(tmp_path / "run", device=device)
    x_hat = apply_reconstruction(model, observations.y)
    assert x_hat.device == observations.y.device
    with torch.no_grad():
        expected = result.network(observations.y.to(device)).cpu()
    torch.testing.assert_close(x_hat, expected, rtol=0, atol=1e-5)


def test_a_run_written_before_an_option_existed_resumes(tmp_path, data, monkeypatch):
    """A SUD² run folder and checkpoint without ``warmup`` (added later) resume as if it were 0;
    another option's change is still refused."""
    import cleanprior.learning.sud as sud_module

    config = tiny("sud2")
    config = dataclasses.replace(config, sud=dataclasses.replace(config.sud, steps=6))
    full = fit(data, tmp_path / "full", "sud2", config=config)

    class Stop(Exception):
        pass

    def stop_at_4(step: int, loss: float) -> None:
        if step == 4:
            raise Stop

    original = sud_module.train_reconstruction
    monkeypatch.setattr(
        sud_module,
        "train_reconstruction",
        lambda *args, **kwargs: original(*args, callback=stop_at_4, **kwargs),
    )
    with pytest.raises(Stop):
        fit(data, tmp_path / "run", "sud2", config=config)
    monkeypatch.setattr(sud_module, "train_reconstruction", original)
    settings = json.loads((tmp_path / "run" / "config.json").read_text())
    del settings["config"]["sud"]["warmup"]
    (tmp_path / "run" / "config.json").write_text(json.dumps(settings))
    (checkpoint,) = [p for p in (tmp_path / "run").glob("*.pt")]
    state = torch.load(checkpoint, weights_only=False)
    del state["metadata"]["config"]["warmup"]
    torch.save(state, checkpoint)
    with pytest.raises(ValueError, match="configuration differs"):
        other = dataclasses.replace(config, sud=dataclasses.replace(config.sud, lambda_1=0.5))
        fit(data, tmp_path / "run", "sud2", config=other, resume=True)
    resumed = fit(data, tmp_path / "run", "sud2", config=config, resume=True)
    assert resumed.metrics["history"] == full.metrics["history"]
