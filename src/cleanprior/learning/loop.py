r"""The single-level image-to-image networks' use of the one training loop.

SUD and SUD² (:mod:`cleanprior.learning.sud`), Noise2Score's score network
(:mod:`cleanprior.learning.noise2score`) and the SURE denoiser (:mod:`cleanprior.learning.sure`)
train a network without noise conditioning by descending a per-step loss with AdamW. Only the
loss differs, so they share :func:`train_network`, which puts their loss into the one training
loop (:func:`cleanprior.training.optimize`: the learning-rate schedule, gradient clipping, an
optional exponential moving average of the weights, the progress bar, the non-finite check and
the loss history) and adds their checkpoint layout and the refusal to resume with other
options.

A checkpoint written by :func:`train_network` holds

- ``kind``: the method's name, checked when resuming;
- ``network``: the class name and ``config`` (when the network has one) that rebuild it;
- ``state_dict``: the weights to use (the moving average when ``ema_decay > 0``);
- ``metadata``: ``config`` (the options, as a dict), ``step`` and the caller's extra entries;
- ``training``: the loop's state (weights, moving average, optimiser, generator, history, step).
"""

from __future__ import annotations

import copy
import dataclasses
import os
import pathlib
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from cleanprior.training.loop import Update, optimize, resume_state

__all__ = ["LoopConfig", "check_network", "make_generator", "train_network"]


class LoopConfig(Protocol):
    """What :func:`train_network` reads from a method's options (a dataclass).

    Attributes:
        steps: Optimiser steps of the whole run.
        lr: AdamW's peak learning rate.
        weight_decay: AdamW's decoupled weight decay.
        clip: Maximum gradient norm (0 disables clipping).
        checkpoint_every: Steps between checkpoints.

    A config may also define ``lr_factor(step) -> float`` (the schedule; constant otherwise)
    and ``ema_decay`` in [0, 1) (0 or absent: no moving average).
    """

    steps: int
    lr: float
    weight_decay: float
    clip: float
    checkpoint_every: int


def make_generator(generator: torch.Generator | None, caller: str) -> torch.Generator:
    """The CPU generator of a training run: the one given, or one seeded from torch's.

    Raises:
        ValueError: If ``generator`` is not a CPU generator (minibatch indices are drawn on
            the CPU, so that a run resumes identically on any device).
    """
    if generator is None:
        return torch.Generator().manual_seed(int(torch.randint(2**62, (1,)).item()))
    if generator.device.type != "cpu":
        raise ValueError(f"{caller} takes a CPU generator (it draws minibatch indices)")
    return generator


def check_network(
    network: nn.Module, sample: Tensor, expected: torch.Size, name: str, output: str = "the shape"
) -> torch.device:
    """Check that ``network`` has parameters and maps ``sample`` to the ``expected`` shape.

    Arguments:
        network: The network to train.
        sample: One input, shape ``(1, *in_shape)``.
        expected: The output's expected shape ``(1, *out_shape)``.
        name: What the network is, for the error messages.
        output: What its output should be, for the error message.

    Returns:
        The device of the network's parameters (the training device).

    Raises:
        ValueError: If the network has no parameters or maps ``sample`` to another shape.
    """
    parameters = list(network.parameters())
    if not parameters:
        raise ValueError(f"the {name} ({type(network).__name__}) has no parameters to train")
    device = parameters[0].device
    with torch.no_grad():
        network.eval()
        got = network(sample.to(device)).shape
    if got != expected:
        raise ValueError(
            f"the {name} maps an input of shape {tuple(sample.shape[1:])} to "
            f"{tuple(got[1:])}, not to {output} {tuple(expected[1:])}"
        )
    return device


def _defaults(config: Any) -> dict[str, Any]:
    """The default of every field of a dataclass that has one (as ``asdict`` would write it)."""
    defaults = {}
    for field in dataclasses.fields(config):
        if field.default is not dataclasses.MISSING:
            defaults[field.name] = field.default
        elif field.default_factory is not dataclasses.MISSING:
            value = field.default_factory()
            defaults[field.name] = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
    return defaults


def _refuse_other_options(
    path: pathlib.Path, state: dict[str, Any], kind: str, config: Any, metadata: Mapping[str, Any]
) -> None:
    """Raise ValueError, naming what differs, unless ``state`` was written by this run's options."""
    if state["kind"] != kind:
        raise ValueError(f"{path} is a {state['kind']!r} checkpoint, not a {kind!r} one")
    # an option added after the checkpoint was written counts as having had its default
    saved = {**_defaults(config), **state["metadata"]["config"]}
    current = dataclasses.asdict(config)
    differ = sorted(k for k in current if k != "checkpoint_every" and saved.get(k) != current[k])
    if differ:
        changes = ", ".join(f"{k}: {saved.get(k)!r} -> {current[k]!r}" for k in differ)
        raise ValueError(
            f"{path} was written with other options ({changes}); resume with the same options "
            "or start a new checkpoint"
        )
    for key, value in metadata.items():
        if state["metadata"].get(key) != value:
            raise ValueError(f"{path} was trained with another {key}; resume with the same data")


def train_network(
    network: nn.Module,
    loss: Callable[[int], Mapping[str, Tensor]],
    config: Any,
    *,
    kind: str,
    generator: torch.Generator,
    checkpoint: str | os.PathLike[str] | None = None,
    resume: bool = False,
    progress: bool = True,
    callback: Callable[[int, float], None] | None = None,
    metadata: Mapping[str, Any] | None = None,
    postfix: Callable[[int], Mapping[str, str]] | None = None,
) -> tuple[nn.Module, dict[str, list[float]]]:
    r"""Train ``network`` in place by AdamW on a loss drawn afresh at every step.

    At step :math:`k` the learning rate is ``config.lr * config.lr_factor(k)``, ``loss(k)``
    returns the step's terms (``"loss"``, the one descended, and any others to record), the
    gradient is clipped to norm ``config.clip`` and the moving average, if any, follows the
    weights by :math:`\bar\theta \leftarrow \bar\theta + (1 - \text{decay})(\theta - \bar\theta)`.

    ``loss`` must draw all its randomness from ``generator`` (directly, or through generators
    seeded from it): the generator's state is checkpointed, so that a resumed run repeats the
    uninterrupted one.

    Arguments:
        network: The network, trained in place; its parameters' device is the training device.
        loss: ``loss(step)``: a mapping with the scalar ``"loss"`` and other scalar terms.
        config: The method's options (see :class:`LoopConfig`): a dataclass, recorded in the
            checkpoint and compared when resuming.
        kind: The method's name, written in the checkpoint and checked when resuming.
        generator: The run's CPU generator (see :func:`make_generator`).
        checkpoint: A file written every ``config.checkpoint_every`` steps and at the end
            (atomically).
        resume: Continue from ``checkpoint`` if it exists.
        progress: Show a progress bar with the mean loss of the last 50 steps.
        callback: Called as ``callback(step, loss)`` for every step, at the loop's reads.
        metadata: Extra entries of the checkpoint's metadata that must equal the saved ones
            when resuming (e.g. the noise level of the data).
        postfix: More fields of the progress bar at a step.

    Returns:
        The network to use (the moving average when ``config.ema_decay > 0``, else
        ``network``), in eval mode, and the history: per term, its value at every step of the
        whole run (resumed steps included).

    Raises:
        ValueError: If the checkpoint is of another kind or was written with other options or
            metadata.
        FloatingPointError: If the loss or the weights become non-finite (the checkpoint keeps
            the last good state).
    """
    from cleanprior.runs.checkpoint import load_checkpoint, save_checkpoint

    metadata = dict(metadata or {})
    decay = float(getattr(config, "ema_decay", 0.0))
    ema = copy.deepcopy(network).eval().requires_grad_(False) if decay > 0 else None
    update = Update(
        "loss", network, lambda step, repeat: loss(step), config.lr, config.weight_decay, config.clip, ema, decay
    )
    path = pathlib.Path(checkpoint) if checkpoint is not None else None
    state = None
    if resume and path is not None and path.exists():
        saved = load_checkpoint(
            path, map_location=next(network.parameters()).device,
            keys=("kind", "state_dict", "metadata", "training"),
        )
        _refuse_other_options(path, saved, kind, config, metadata)
        state = resume_state(saved)

    def save(current: dict[str, Any]) -> None:
        if path is None:
            return
        save_checkpoint(
            path,
            {
                "kind": kind,
                "network": {"name": type(network).__name__, "config": getattr(network, "config", None)},
                "state_dict": (current["emas"] if ema is not None else current["models"])["loss"],
                "metadata": {"config": dataclasses.asdict(config), "step": current["step"], **metadata},
                "training": current,
            },
        )

    trained = optimize(
        [update],
        steps=config.steps,
        generator=generator,
        lr_factor=getattr(config, "lr_factor", None),
        log_every=getattr(config, "log_every", 50),
        checkpoint_every=config.checkpoint_every,
        state=state,
        save=save,
        progress=progress,
        desc=kind,
        callback=callback,
        postfix=postfix,
    )
    return (ema if ema is not None else network), trained.history
