"""Checkpoints: a denoiser with its configuration and metadata, written atomically.

A checkpoint is a ``torch.save`` file holding only plain types (dicts, lists, strings, numbers and
tensors), so it loads with ``weights_only=True`` and never executes code from the file:

.. code-block:: text

    format      "cleanprior.checkpoint"
    version     1
    denoiser    {"network": class name, "network_config": {...}, "sigma_data": float}
    state_dict  the denoiser's weights (the EMA weights when trained)
    metadata    {"created": ISO time, "trained_on": ..., "config": {...}, ...}
    training    optional: what resumes training (raw weights, optimizer, step, generator, losses)

Writes go to a temporary file in the same folder, are flushed to disk, then renamed over the target
(``os.replace`` is atomic on POSIX and Windows), so a crash mid-write leaves the previous good file.
"""

from __future__ import annotations

import datetime
import os
import pathlib
from typing import Any

import torch
from torch import nn

from cleanprior.diffusion.precondition import PreconditionedDenoiser
from cleanprior.runs.atomic import atomic_path

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "save_denoiser", "load_denoiser"]

FORMAT = "cleanprior.checkpoint"
VERSION = 1


class CheckpointError(ValueError):
    """A file is not a readable cleanprior checkpoint."""


def save_checkpoint(path: str | os.PathLike[str], payload: dict[str, Any]) -> pathlib.Path:
    """Write a checkpoint payload atomically.

    Arguments:
        path: The target file; its folder is created if needed.
        payload: Plain data and tensors (``format`` and ``version`` are added).

    Returns:
        The path written.
    """
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": FORMAT, "version": VERSION, **payload}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def load_checkpoint(
    path: str | os.PathLike[str],
    map_location: str | torch.device | None = "cpu",
    *,
    keys: tuple[str, ...] = ("denoiser", "state_dict", "metadata"),
) -> dict[str, Any]:
    """Read and validate a checkpoint.

    Arguments:
        path: The file.
        map_location: Where tensors are loaded.
        keys: The entries it must hold (a denoiser's by default).

    Returns:
        The payload.

    Raises:
        FileNotFoundError: If the file does not exist.
        CheckpointError: If the file is corrupt, foreign, or of an unknown version.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:
        raise CheckpointError(f"{path} is not a readable checkpoint (corrupt or truncated?): {error}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} was not written by cleanprior (no '{FORMAT}' format marker)")
    if payload.get("version") != VERSION:
        raise CheckpointError(
            f"{path} has checkpoint version {payload.get('version')!r}; this cleanprior reads version {VERSION}"
        )
    for key in keys:
        if key not in payload:
            raise CheckpointError(f"{path} lacks the '{key}' entry")
    return payload


def _metadata(metadata: dict[str, Any] | None) -> dict[str, Any]:
    from cleanprior import __version__

    return {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cleanprior_version": __version__,
        "torch_version": str(torch.__version__),
        **(metadata or {}),
    }


def save_denoiser(
    path: str | os.PathLike[str],
    denoiser: PreconditionedDenoiser,
    metadata: dict[str, Any] | None = None,
    training: dict[str, Any] | None = None,
) -> pathlib.Path:
    """Save a preconditioned denoiser with what rebuilds it.

    Arguments:
        path: The target file.
        denoiser: The denoiser; its network must record its ``config``.
        metadata: What it was trained on, with which options (plain data); the time, the
            cleanprior and torch versions are added.
        training: Optional state that resumes training.

    Returns:
        The path written.
    """
    payload: dict[str, Any] = {
        "denoiser": denoiser.config,
        "state_dict": {k: v.detach().cpu() for k, v in denoiser.state_dict().items()},
        "metadata": _metadata(metadata),
    }
    if training is not None:
        payload["training"] = training
    return save_checkpoint(path, payload)


def build_denoiser(config: dict[str, Any]) -> PreconditionedDenoiser:
    """Rebuild an untrained denoiser from a checkpoint's ``denoiser`` entry."""
    from cleanprior.nn import build_network

    try:
        network: nn.Module = build_network(config["network"], **config["network_config"])
        return PreconditionedDenoiser(network, sigma_data=config["sigma_data"])
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"the checkpoint's denoiser configuration is invalid: {error}") from None


def load_denoiser(
    path: str | os.PathLike[str], device: str | torch.device | None = None
) -> PreconditionedDenoiser:
    """Load a denoiser saved by :func:`save_denoiser` (or a training checkpoint), in eval mode.

    Arguments:
        path: The file.
        device: Where to put it (CPU by default).

    Returns:
        The denoiser, with ``metadata`` attached as an attribute.

    Raises:
        FileNotFoundError: If the file does not exist.
        CheckpointError: If the file is corrupt, foreign, or its weights do not fit its
            configuration.
    """
    payload = load_checkpoint(path)
    # the fresh network's random initialisation is overwritten at once: keep it off the caller's
    # global generator
    with torch.random.fork_rng(devices=[]):
        denoiser = build_denoiser(payload["denoiser"])
    try:
        denoiser.load_state_dict(payload["state_dict"])
    except RuntimeError as error:
        raise CheckpointError(f"{path}: the weights do not fit the saved configuration: {error}") from None
    denoiser.metadata = payload["metadata"]
    return denoiser.to(device or "cpu").eval()
