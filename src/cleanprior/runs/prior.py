"""Training a prior on clean data into a run folder, and drawing samples from a run.

A run folder holds everything a run made, so that it can be inspected, resumed and reloaded:

.. code-block:: text

    RUN/config.json     the resolved configuration (every option, defaults included)
    RUN/checkpoint.pt   the EMA denoiser with its metadata and the state that resumes training
    RUN/metrics.json    the loss curve and timings
    RUN/samples.png     a grid of prior samples (images) or RUN/samples.npz (vectors)

This is also the upper bound of the learning methods of later rounds: a prior trained on clean data.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import time
from typing import Any

import torch
from torch import Tensor

from cleanprior.devices import resolve_device
from cleanprior.diffusion.precondition import PreconditionedDenoiser
from cleanprior.diffusion.samplers import sample_prior
from cleanprior.diffusion.training import TrainConfig, train
from cleanprior.runs.atomic import atomic_path, write_json
from cleanprior.runs.checkpoint import load_checkpoint, load_denoiser

__all__ = [
    "NetworkConfig",
    "SampleConfig",
    "default_network",
    "reconstruction_figure",
    "sample_run",
    "train_prior",
]


@dataclasses.dataclass
class NetworkConfig:
    """The denoiser's network.

    Attributes:
        name: ``"auto"`` (an MLP for vectors, a U-Net for images), ``"MLP"`` or ``"UNet"``.
        channels: U-Net channels per level.
        blocks: U-Net residual blocks per level.
        hidden: MLP hidden widths.
        dropout: Dropout rate.
        sigma_data: The data's standard deviation in the preconditioning.
    """

    name: str = "auto"
    channels: tuple[int, ...] = (32, 64, 128)
    blocks: int = 2
    hidden: tuple[int, ...] = (256, 256, 256)
    dropout: float = 0.0
    sigma_data: float = 0.5


@dataclasses.dataclass
class SampleConfig:
    """How prior samples are drawn.

    Attributes:
        n: The number of samples.
        steps: Sampler steps.
        sampler: ``ddim``, ``ddpm``, ``euler``, ``heun`` or ``pc``.
        seed: The seed of the sampling generator.
        batch_size: Samples per denoiser call.
    """

    n: int = 64
    steps: int = 64
    sampler: str = "heun"
    seed: int = 0
    batch_size: int = 256


def default_network(shape: tuple[int, ...], config: NetworkConfig) -> PreconditionedDenoiser:
    """Build the denoiser a configuration names for samples of ``shape``.

    Arguments:
        shape: One sample's shape: ``(d,)`` for vectors, ``(C, H, W)`` for images.
        config: The network options.

    Raises:
        ValueError: For an unknown network name or a shape it cannot take.
    """
    from cleanprior.nn import MLP, UNet

    name = config.name
    if name == "auto":
        name = "MLP" if len(shape) == 1 else "UNet"
    if name == "MLP":
        if len(shape) != 1:
            raise ValueError(f"the MLP takes vectors, got samples of shape {shape}")
        network = MLP(shape[0], hidden=config.hidden, dropout=config.dropout)
    elif name == "UNet":
        if len(shape) != 3:
            raise ValueError(f"the U-Net takes images (C, H, W), got samples of shape {shape}")
        network = UNet(in_channels=shape[0], channels=config.channels, blocks=config.blocks, dropout=config.dropout)
    else:
        raise ValueError(f"unknown network {config.name!r}; choose 'auto', 'MLP' or 'UNet'")
    return PreconditionedDenoiser(network, sigma_data=config.sigma_data)


def train_prior(
    data: Tensor,
    run: str | os.PathLike[str],
    *,
    network: NetworkConfig | None = None,
    training: TrainConfig | None = None,
    sampling: SampleConfig | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
    resume: bool = False,
    description: str = "",
) -> PreconditionedDenoiser:
    """Train a prior on clean samples into a run folder and write samples of it.

    Arguments:
        data: Clean samples, shape ``(N, *shape)``, scaled to about [-1, 1].
        run: The run folder (created).
        network: The network options.
        training: The training options.
        sampling: How the samples written at the end are drawn.
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
        seed: The seed of the training generator.
        resume: Continue an interrupted run in ``run`` (its configuration must match).
        description: What the data are (recorded in the checkpoint).

    Returns:
        The trained (EMA) denoiser.

    Raises:
        FileExistsError: If ``run`` already holds a checkpoint and ``resume`` is False (nothing
            is overwritten).
        ValueError: If resuming with another configuration than the run's.
    """
    network = network or NetworkConfig()
    training = training or TrainConfig()
    sampling = sampling or SampleConfig()
    device = resolve_device(device)
    run = pathlib.Path(run)
    checkpoint = run / "checkpoint.pt"
    config = {
        "command": "train",
        "data": {"description": description, "shape": list(data.shape)},
        "network": dataclasses.asdict(network),
        "training": dataclasses.asdict(training),
        "sampling": dataclasses.asdict(sampling),
        "device": str(device),
        "seed": seed,
    }
    if checkpoint.exists() and not resume:
        raise FileExistsError(f"{run} already holds a run; pass resume=True (--resume) to continue it, or choose another folder")
    if resume and (run / "config.json").exists():
        previous = json.loads((run / "config.json").read_text())
        changed = sorted(k for k in ("data", "network", "training", "seed") if json.loads(json.dumps(previous.get(k), default=str)) != json.loads(json.dumps(config[k], default=str)))
        if changed:
            raise ValueError(f"cannot resume {run}: its {', '.join(changed)} configuration differs from the one given")
    # torch's initialisers draw from the global generator: a scoped seed makes the initial weights
    # a function of ``seed`` and leaves the caller's global state as it was
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        denoiser = default_network(tuple(data.shape[1:]), network).to(device)
    run.mkdir(parents=True, exist_ok=True)
    write_json(run / "config.json", config)

    started = time.perf_counter()
    result = train(
        denoiser,
        data,
        training,
        generator=torch.Generator().manual_seed(seed),
        checkpoint=checkpoint,
        resume=resume,
        metadata={"trained_on": description, "shape": list(data.shape[1:]), "network": dataclasses.asdict(network)},
    )
    write_json(run / "metrics.json", {"losses": result.losses, "train_seconds": time.perf_counter() - started})
    sample_run(run, sampling, device=device)
    return result.denoiser


def load_run_prior(run: str | os.PathLike[str], device: str | torch.device = "cpu") -> Any:
    """The prior of a run folder, ready for every sampler.

    Reads ``RUN/checkpoint.pt``; a prior learned from noisy data (SURE, AmbientDiffusion's noisy
    form) records there the wrapper that makes it a denoiser at every level (below the data's
    noise level it was never trained), and it is applied.

    Arguments:
        run: A run folder of ``train``, ``fit`` or ``demo``.
        device: Where to load it.

    Returns:
        A denoiser ``D(x_t, sigma)``.
    """
    denoiser = load_denoiser(pathlib.Path(run) / "checkpoint.pt", device=device)
    wrapper = denoiser.metadata.get("sampling_wrapper")
    if wrapper:
        from cleanprior.learning.baselines import sampling_wrapper

        return sampling_wrapper(denoiser, wrapper)
    return denoiser


def sample_run(
    run: str | os.PathLike[str],
    sampling: SampleConfig | None = None,
    *,
    device: str | torch.device = "cpu",
    output: str | os.PathLike[str] | None = None,
) -> pathlib.Path:
    """Draw prior samples from a run's checkpoint and write them.

    Every sample goes to ``output`` (``RUN/samples.npz`` by default) under ``x``, and images also
    to a PNG grid beside it (``samples.png``).

    Arguments:
        run: The run folder.
        sampling: How to sample.
        device: Where to sample (``"auto"``: CUDA when available).
        output: The ``.npz`` to write.

    Returns:
        The ``.npz`` written.
    """
    import numpy as np

    from cleanprior.runs.report import save_image_grid

    sampling = sampling or SampleConfig()
    run = pathlib.Path(run)
    device = resolve_device(device)
    denoiser = load_run_prior(run, device=device)
    shape = tuple(load_checkpoint(run / "checkpoint.pt")["metadata"]["shape"])
    generator = torch.Generator(device=device).manual_seed(sampling.seed)
    x = sample_prior(
        denoiser, sampling.n, shape=shape, steps=sampling.steps, sampler=sampling.sampler,
        generator=generator, batch_size=sampling.batch_size, progress=True,
    ).cpu()
    path = pathlib.Path(output) if output is not None else run / "samples.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        np.savez(tmp, x=x.numpy())
    if len(shape) == 3:
        save_image_grid(x, path.with_suffix(".png"))
    return path


def reconstruction_figure(
    denoiser: PreconditionedDenoiser,
    clean: Tensor,
    operator: Any,
    noise_std: float,
    path: str | os.PathLike[str],
    *,
    samples: int = 4,
    method: str = "mmps",
    steps: int = 64,
    generator: torch.Generator | None = None,
    **options: Any,
) -> dict[str, float]:
    """Corrupt clean images, draw posterior samples, and write a figure a person can read.

    The PNG has one column per image and five rows: the clean image, the observation seen through
    the adjoint (zeros where pixels are missing), the posterior mean over ``samples`` draws, the
    pixel-wise posterior standard deviation (scaled to [-1, 1] by its maximum), and one draw.

    Arguments:
        denoiser: The prior denoiser.
        clean: Clean images, shape ``(B, C, H, W)`` in [-1, 1].
        operator: The forward model, with per-item parameters for ``B`` observations.
        noise_std: The observation noise.
        path: The PNG to write.
        samples: Posterior draws per image.
        method: The posterior method (see :func:`cleanprior.sample_posterior`).
        steps: Sampler steps.
        generator: The source of randomness.
        options: More options of :func:`cleanprior.sample_posterior`.

    Returns:
        The mean squared errors of the zero-filled observation and of the posterior mean.
    """
    from cleanprior.operators.observation import corrupt
    from cleanprior.posterior.api import sample_posterior
    from cleanprior.runs.report import save_image_grid

    y, A = corrupt(clean, operator, noise_std, generator=generator)
    from cleanprior.operators.registry import repeat_items

    B = clean.shape[0]
    x = sample_posterior(
        denoiser, repeat_items(A, samples, B), y.repeat_interleave(samples, 0), shape=tuple(clean.shape[1:]),
        noise_std=noise_std, method=method, steps=steps, generator=generator, **options,
    ).reshape(B, samples, *clean.shape[1:])
    mean, std = x.mean(1), x.std(1)
    observed = A.adjoint(y)
    rows = [clean, observed.clamp(-1, 1), mean, 2 * std / std.max().clamp_min(1e-12) - 1, x[:, 0]]
    save_image_grid(torch.cat(rows), path, nrow=B)
    return {
        "mse_observation": float(((observed - clean) ** 2).mean()),
        "mse_posterior_mean": float(((mean - clean) ** 2).mean()),
    }
