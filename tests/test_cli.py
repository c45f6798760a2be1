import json

import numpy as np
import pytest
import torch

from cleanprior import load_denoiser
from cleanprior.cli import load_data, main


def test_train_then_sample_on_vectors(tmp_path, device):
    x = np.random.default_rng(0).normal(size=(128, 3)).astype(np.float32)
    np.savez(tmp_path / "clean.npz", x=x)
    run = tmp_path / "run"
    main(["train", str(tmp_path / "clean.npz"), "-o", str(run), "--training.steps", "4", "--training.batch_size", "16",
          "--training.progress", "false", "--network.hidden", "[16,16]", "--sampling.n", "5", "--sampling.steps", "3",
          "--device", str(device)])
    config = json.loads((run / "config.json").read_text())
    assert config["training"]["steps"] == 4 and config["network"]["hidden"] == [16, 16]
    assert config["training"]["lr"] == 1e-3  # defaults are written out too
    assert np.load(run / "samples.npz")["x"].shape == (5, 3)
    assert load_denoiser(run / "checkpoint.pt").metadata["step"] == 4
    metrics = json.loads((run / "metrics.json").read_text())
    assert len(metrics["losses"]) == 4

    # an existing run is never overwritten without --resume
    before = (run / "checkpoint.pt").read_bytes()
    with pytest.raises(FileExistsError, match="--resume"):
        main(["train", str(tmp_path / "clean.npz"), "-o", str(run), "--training.progress", "false"])
    assert (run / "checkpoint.pt").read_bytes() == before
    # resuming with another configuration is refused
    with pytest.raises(ValueError, match="training"):
        main(["train", str(tmp_path / "clean.npz"), "-o", str(run), "--training.steps", "8", "--training.progress", "false",
              "--network.hidden", "[16,16]", "--sampling.n", "5", "--sampling.steps", "3", "--resume", "true"])

    main(["sample", str(run), "-n", "7", "--steps", "2", "-o", str(tmp_path / "more.npz"), "--device", str(device)])
    assert np.load(tmp_path / "more.npz")["x"].shape == (7, 3)


def test_bad_data_sources_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither an embedded dataset"):
        load_data(str(tmp_path / "nothing.npz"))
    np.savez(tmp_path / "noclean.npz", y=np.zeros((3, 2)))
    with pytest.raises(ValueError, match="under the key 'x'"):
        load_data(str(tmp_path / "noclean.npz"))
    np.savez(tmp_path / "nan.npz", x=np.full((3, 2), np.nan))
    with pytest.raises(ValueError, match="NaN"):
        load_data(str(tmp_path / "nan.npz"))
    assert load_data("digits").shape[1:] == torch.Size([1, 8, 8])


def test_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    commands = ("corrupt", "train", "fit", "sample", "reconstruct", "evaluate", "demo", "recon", "apply")
    assert all(command in out for command in commands)
    for command in commands:  # every command has help text for every option
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = capsys.readouterr().out
        assert "--config" in text


def test_image_run_writes_a_sample_grid(tmp_path):
    from PIL import Image

    run = tmp_path / "digits"
    main(["train", "digits", "-o", str(run), "--training.steps", "2", "--training.batch_size", "8", "--training.progress", "false",
          "--network.channels", "[8,16]", "--network.blocks", "1", "--sampling.n", "4", "--sampling.steps", "2"])
    grid = np.asarray(Image.open(run / "samples.png"))
    # 2 x 2 tiles of 8 x 8 pixels with 1 pixel of padding around and between them
    assert grid.shape[:2] == (2 * 8 + 3, 2 * 8 + 3)
    assert load_denoiser(run / "checkpoint.pt").metadata["trained_on"] == "digits (train)"


def test_the_commands_run_end_to_end_on_a_tiny_set(tmp_path, device):
    obs, run = tmp_path / "obs.npz", tmp_path / "run"
    main(["corrupt", "digits", "-o", str(obs), "--operator", "mask", "--missing", "0.5", "--noise-std", "0.05",
          "--limit", "96"])
    with np.load(obs) as file:
        assert file["y"].shape == (96, 1, 8, 8) and file["mask"].shape == (96, 1, 8, 8)
        assert abs(1 - file["mask"].mean() - 0.5) < 0.05
    main(["fit", str(obs), "-o", str(run), "--rounds", "1", "--steps", "4", "--heldout", "16", "--gaussian_rank", "4",
          "--gaussian_iterations", "2", "--network.channels", "[8,16]", "--network.blocks", "1",
          "--training.steps", "3", "--training.batch_size", "8", "--training.progress", "false",
          "--evaluation.prior_samples", "4", "--evaluation.steps", "2", "--device", str(device)])
    config = json.loads((run / "config.json").read_text())
    assert config["em"]["rounds"] == 1 and config["training"]["steps"] == 3
    assert "<table>" in (run / "report.html").read_text()
    main(["sample", str(run), "-n", "3", "--steps", "2", "-o", str(tmp_path / "samples.npz"), "--device", str(device)])
    assert np.load(tmp_path / "samples.npz")["x"].shape == (3, 1, 8, 8)
    main(["reconstruct", str(run), str(obs), "-o", str(tmp_path / "post.npz"), "--samples", "2", "--steps", "2",
          "--device", str(device)])
    with np.load(tmp_path / "post.npz") as post:
        assert post["x"].shape == (96, 2, 1, 8, 8) and post["std"].shape == (96, 1, 8, 8)
        assert np.isfinite(post["x"]).all()
    main(["evaluate", str(run), str(obs), "--limit", "8", "--steps", "2", "--evaluation.prior_samples", "4",
          "--evaluation.steps", "2", "-o", str(tmp_path / "eval"), "--device", str(device)])
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert {"ppc", "psnr_mean", "ssim_mean"} <= set(metrics)


@pytest.mark.parametrize("method", ["emdiffusion", "flowdiff", "ambient", "naive", "clean"])
def test_fit_takes_every_learning_method(tmp_path, method, device):
    obs, run = tmp_path / "obs.npz", tmp_path / "run"
    main(["corrupt", "digits", "-o", str(obs), "--operator", "mask", "--missing", "0.5", "--limit", "64"])
    main(["corrupt", "digits", "-o", str(tmp_path / "few.npz"), "--operator", "identity", "--split", "test", "--limit", "10"])
    main(["fit", str(obs), "-o", str(run), "--method", method, "--init-clean", str(tmp_path / "few.npz"),
          "--rounds", "1", "--steps", "2", "--heldout", "8", "--zetas", "[0.3,1.0]", "--tune_observations", "4",
          "--network.channels", "[8,16]", "--network.blocks", "1", "--training.steps", "3", "--training.batch_size", "8",
          "--training.progress", "false", "--evaluation.prior_samples", "4", "--evaluation.steps", "2",
          "--flow.hidden", "8", "--flow.layers", "1", "--flow.batch_size", "8", "--device", str(device)])
    config = json.loads((run / "config.json").read_text())
    metrics = json.loads((run / "metrics.json").read_text())
    assert config["method"] == method and metrics[-1]["round"] == 1
    assert ("amortized_psnr" in metrics[-1]) == (method == "flowdiff")
    assert ("dps_zeta" in metrics[-1]) == (method == "emdiffusion")
    assert load_denoiser(run / "checkpoint.pt").metadata["method"] == method
    if method == "ambient":
        # images are sampled through one fixed mask per trajectory (EMConfig.sampling_keep)
        from cleanprior.runs.prior import load_run_prior

        prior = load_run_prior(run)
        assert type(prior).__name__ == "FixedMaskDenoiser" and prior.keep == 0.65


def test_a_bad_observation_file_leaves_an_existing_run_untouched(tmp_path):
    import hashlib

    from cleanprior.data.files import ObservationFileError

    obs, run = tmp_path / "obs.npz", tmp_path / "run"
    main(["corrupt", "digits", "-o", str(obs), "--missing", "0.5", "--noise-std", "0.05", "--limit", "48"])
    main(["fit", str(obs), "-o", str(run), "--rounds", "0", "--heldout", "8", "--gaussian_rank", "2",
          "--gaussian_iterations", "1", "--evaluation.prior_samples", "4"])
    digest = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in run.rglob("*") if p.is_file()}
    with np.load(obs) as file:
        arrays = dict(file)
    nan_y = dict(arrays, y=arrays["y"].copy())
    nan_y["y"][3, 0, 2, 2] = np.nan
    bad = {
        "y contains 1 NaN": nan_y,
        "operator": {k: v for k, v in arrays.items() if k != "operator"},
        "47": dict(arrays, mask=arrays["mask"][:47]),
        "blurr": dict(arrays, operator=np.array("blurr")),
        "nosie_std": dict(arrays, nosie_std=arrays["noise_std"]),
    }
    for i, (message, content) in enumerate(bad.items()):
        np.savez(tmp_path / f"bad{i}.npz", **content)
        with pytest.raises(ObservationFileError, match=message):
            main(["fit", str(tmp_path / f"bad{i}.npz"), "-o", str(run), "--resume", "true"])
    (tmp_path / "truncated.npz").write_bytes(obs.read_bytes()[:1000])
    with pytest.raises(ObservationFileError, match="truncated.npz"):
        main(["fit", str(tmp_path / "truncated.npz"), "-o", str(run), "--resume", "true"])
    with pytest.raises((FileNotFoundError, ObservationFileError), match="missing.npz"):
        main(["fit", str(tmp_path / "missing.npz"), "-o", str(run), "--resume", "true"])
    assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in run.rglob("*") if p.is_file()} == digest


def test_recon_and_apply_run_end_to_end(tmp_path, device):
    """A SUD^2 network from 5 pairs, unpaired observations and a prior run, and a SURE denoiser from
    noisy images only; apply writes one reconstruction per observation under x."""
    obs, pairs = tmp_path / "obs.npz", tmp_path / "pairs.npz"
    main(["corrupt", "digits", "-o", str(obs), "--operator", "identity", "--noise-std", "0.2", "--limit", "48"])
    main(["corrupt", "digits", "-o", str(pairs), "--operator", "identity", "--noise-std", "0.2", "--split", "test",
          "--limit", "5"])
    main(["train", "digits", "-o", str(tmp_path / "prior"), "--training.steps", "2", "--training.batch_size", "8",
          "--training.progress", "false", "--network.channels", "[8,16]", "--network.blocks", "1", "--sampling.n", "2",
          "--sampling.steps", "2", "--device", str(device)])
    small = ["--options.channels", "[8,16]", "--options.heldout", "8", "--device", str(device)]
    main(["recon", str(obs), "-o", str(tmp_path / "sud2"), "--method", "sud2", "--pairs", str(pairs), "--prior",
          str(tmp_path / "prior"), *small, "--options.sud.steps", "3", "--options.sud.sud2_steps", "2"])
    main(["recon", str(obs), "-o", str(tmp_path / "sure"), "--method", "sure", *small, "--options.sure.steps", "3"])
    for run in ("sud2", "sure"):
        config = json.loads((tmp_path / run / "config.json").read_text())
        assert config["command"] == "recon" and config["config"]["method"] == run
        main(["apply", str(tmp_path / run), str(obs), "-o", str(tmp_path / f"{run}.npz"), "--device", str(device)])
        with np.load(tmp_path / f"{run}.npz") as out:
            assert out["x"].shape == (48, 1, 8, 8) and np.isfinite(out["x"]).all()


def device_arguments(command, path):
    """The positional arguments and output of ``command``, every file at ``path`` (which need not exist)."""
    return {
        "train": [path, "-o", path], "fit": [path, "-o", path], "sample": [path], "reconstruct": [path, path, "-o", path],
        "evaluate": [path, path], "demo": ["-o", path], "recon": [path, "-o", path], "apply": [path, path, "-o", path],
    }[command]


DEVICE_COMMANDS = ("train", "fit", "sample", "reconstruct", "evaluate", "demo", "recon", "apply")


@pytest.mark.parametrize("command", DEVICE_COMMANDS)
def test_every_command_defaults_to_the_automatic_device(command):
    from cleanprior.cli import build_parser

    config = build_parser().parse_args([command, *device_arguments(command, "somewhere")])
    assert config[command].device == "auto"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
@pytest.mark.parametrize("command", DEVICE_COMMANDS)
def test_cuda_without_a_gpu_is_refused_before_any_work(tmp_path, command):
    """One line naming the fix, before any file is read or written."""
    with pytest.raises(ValueError, match=r"no CUDA GPU.*--device cpu or --device auto") as error:
        main([command, *device_arguments(command, str(tmp_path / "missing")), "--device", "cuda"])
    assert "\n" not in str(error.value)
    assert list(tmp_path.iterdir()) == []
