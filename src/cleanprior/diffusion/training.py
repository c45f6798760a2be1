r"""Denoising score matching: the loss, the noise-level distributions and the training loop.

The denoiser is trained to regress clean samples from noisy ones,

.. math::
    \mathcal{L}(\theta) = \mathbb{E}_{x, \sigma, \epsilon}\; w(\sigma)\,
        \big\| D_\theta(x + \sigma \epsilon, \sigma) - x \big\|^2, \qquad
    w(\sigma) = \frac{1}{\sigma^2} + \frac{1}{\sigma_d^2},

whose minimiser is :math:`E[x \mid x_t]`. With the EDM preconditioning this weight makes the
network's own regression target unit-variance at every level. The loop adds what makes it work in
practice: AdamW, an exponential moving average (EMA) of the weights (the EMA is what gets sampled),
gradient-norm clipping, a learning-rate schedule, optional bfloat16 autocast, a progress bar with
the loss, and periodic atomic checkpoints from which a killed run resumes exactly.

References:
    Vincent (2011). A Connection Between Score Matching and Denoising Autoencoders.
    Karras et al. (2022). Elucidating the Design Space of Diffusion-Based Generative Models,
    section 5. https://arxiv.org/abs/2206.00364
    Rozet et al. (2024). DiEM, appendix C (exponential schedule, Beta-distributed times).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import pathlib
import warnings
from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import Tensor

from cleanprior.diffusion.denoiser import expand_sigma
from cleanprior.diffusion.precondition import PreconditionedDenoiser
from cleanprior.diffusion.schedules import SIGMA_MAX, SIGMA_MIN, ExponentialSchedule
from cleanprior.devices import device_generator
from cleanprior.training.loop import Update, optimize, resume_state

__all__ = [
    "TrainConfig", "TrainResult", "TrainingLoss", "dsm_loss", "dsm_weight", "sample_sigma", "train",
]


@dataclasses.dataclass
class TrainConfig:
    """Options of denoising score matching training.

    Attributes:
        steps: Optimiser steps.
        batch_size: Samples per step.
        lr: Peak learning rate of AdamW.
        lr_schedule: ``"constant"``, ``"linear"`` (decay to 0) or ``"cosine"`` (decay to 0).
        warmup: Steps of linear warm-up from 0 to ``lr``.
        weight_decay: AdamW's decoupled weight decay.
        clip: Maximum gradient norm (``0`` disables clipping).
        ema_decay: Decay of the weights' exponential moving average, in [0, 1).
        noise: The law of training noise levels: ``"lognormal"`` (EDM: ``log sigma ~
            N(p_mean, p_std^2)``) or ``"schedule"`` (``t ~ Beta(t_alpha, t_beta)`` on the
            exponential schedule between ``sigma_min`` and ``sigma_max``; Beta(1, 1) is uniform).
        p_mean: Mean of ``log sigma`` for ``"lognormal"``.
        p_std: Standard deviation of ``log sigma`` for ``"lognormal"``.
        t_alpha: First Beta parameter for ``"schedule"``.
        t_beta: Second Beta parameter for ``"schedule"``.
        sigma_min: Smallest level for ``"schedule"``.
        sigma_max: Largest level for ``"schedule"``.
        amp: bfloat16 autocast for the forward pass: None (the default) turns it on for CUDA
            devices and off elsewhere (much slower on CPUs without native bf16).
        compile: Compile the denoiser with ``torch.compile`` for training (pays on GPUs after
            a compilation of tens of seconds).
        checkpoint_every: Steps between checkpoints (when a checkpoint path is given).
        log_every: Steps between reads of the losses on the host (the only synchronisations of
            a step; the non-finite check acts there).
        progress: Show a progress bar with the loss.
    """

    steps: int = 10_000
    batch_size: int = 256
    lr: float = 1e-3
    lr_schedule: str = "cosine"
    warmup: int = 0
    weight_decay: float = 0.0
    clip: float = 1.0
    ema_decay: float = 0.999
    noise: str = "lognormal"
    p_mean: float = -1.2
    p_std: float = 1.2
    t_alpha: float = 1.0
    t_beta: float = 1.0
    sigma_min: float = SIGMA_MIN
    sigma_max: float = SIGMA_MAX
    amp: bool | None = None
    compile: bool = False
    checkpoint_every: int = 1000
    log_every: int = 50
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "checkpoint_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.lr_schedule not in ("constant", "linear", "cosine"):
            raise ValueError(f"lr_schedule must be 'constant', 'linear' or 'cosine', got {self.lr_schedule!r}")
        if self.noise not in ("lognormal", "schedule"):
            raise ValueError(f"noise must be 'lognormal' or 'schedule', got {self.noise!r}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must lie in [0, 1), got {self.ema_decay}")
        if self.warmup < 0 or self.clip < 0:
            raise ValueError("warmup and clip must be non-negative")

    def autocast(self, device: torch.device) -> bool:
        """Whether training on ``device`` runs in bfloat16 autocast (``amp``, or CUDA when unset)."""
        return device.type == "cuda" if self.amp is None else bool(self.amp)

    def lr_factor(self, step: int) -> float:
        """The learning-rate multiplier at ``step`` (0-based)."""
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = (step - self.warmup) / max(1, self.steps - self.warmup)
        if self.lr_schedule == "linear":
            return 1 - progress
        if self.lr_schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * progress))
        return 1.0


def sample_sigma(config: TrainConfig, n: int, generator: torch.Generator | None = None, device: torch.device | str = "cpu") -> Tensor:
    r"""Draw training noise levels from the law ``config.noise`` selects.

    Returns:
        :math:`\sigma`, shape ``(n,)``, float32.
    """
    if config.noise == "lognormal":
        z = torch.randn(n, generator=generator, device=device)
        return torch.exp(config.p_mean + config.p_std * z)
    if config.t_alpha == config.t_beta == 1:
        t = torch.rand(n, generator=generator, device=device, dtype=torch.float64)
    else:
        t = _beta_from_generator(config.t_alpha, config.t_beta, n, generator, device)
    schedule = ExponentialSchedule(config.sigma_min, config.sigma_max)
    return schedule.sigma(t).float()


def _beta_from_generator(
    alpha: float, beta: float, n: int, generator: torch.Generator | None, device: torch.device | str
) -> Tensor:
    # torch.distributions.Beta draws from the global generator; a ratio of Gamma draws made with
    # ours keeps training reproducible from the generator alone.
    gamma_a = torch._standard_gamma(torch.full((n,), float(alpha), dtype=torch.float64, device=device), generator=generator)
    gamma_b = torch._standard_gamma(torch.full((n,), float(beta), dtype=torch.float64, device=device), generator=generator)
    return gamma_a / (gamma_a + gamma_b)


def dsm_weight(sigma: Tensor, sigma_data: float) -> Tensor:
    r"""The loss weight of denoising score matching, :math:`w(\sigma) = 1/\sigma^2 + 1/\sigma_d^2`.

    With the EDM preconditioning it makes the network's own regression target unit-variance at
    every level; every loss that trains a :class:`PreconditionedDenoiser` (AmbientDiffusion,
    SURE) weighs its levels by it too.

    Arguments:
        sigma: Noise levels, any shape.
        sigma_data: The data's standard deviation :math:`\sigma_d`.

    Returns:
        The weights, shaped like ``sigma``.
    """
    return 1 / sigma**2 + 1 / sigma_data**2


def dsm_loss(
    denoiser: PreconditionedDenoiser,
    x: Tensor,
    sigma: Tensor,
    generator: torch.Generator | None = None,
    noise: Tensor | None = None,
) -> Tensor:
    r"""The weighted denoising loss, one value per sample.

    .. math:: \ell_i = w(\sigma_i)\, \tfrac{1}{n} \| D(x_i + \sigma_i \epsilon_i, \sigma_i) - x_i \|^2,
              \qquad w(\sigma) = 1/\sigma^2 + 1/\sigma_d^2

    (a mean over the :math:`n` entries of a sample, so the scale does not grow with the size).

    Arguments:
        denoiser: The preconditioned denoiser (its ``sigma_data`` sets the weight).
        x: Clean samples, shape ``(B, *shape)``.
        sigma: Noise levels, shape ``(B,)``.
        generator: The source of the noise :math:`\epsilon`.
        noise: The noise :math:`\epsilon` itself, shape ``(B, *shape)`` (then ``generator`` is
            unused).

    Returns:
        The per-sample loss, shape ``(B,)``.
    """
    eps = noise if noise is not None else torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    s = expand_sigma(sigma, x)
    error = denoiser(x + s * eps, sigma) - x
    weight = dsm_weight(sigma, denoiser.sigma_data)
    return weight * error.float().pow(2).flatten(1).mean(1)


class TrainingLoss(Protocol):
    """A per-sample training loss that :func:`train` can use in place of :func:`dsm_loss`."""

    def __call__(
        self,
        denoiser: PreconditionedDenoiser,
        x: Tensor,
        sigma: Tensor,
        noise: Tensor,
        index: Tensor,
        generator: torch.Generator,
    ) -> Tensor:
        """The loss of each sample of a minibatch.

        Arguments:
            denoiser: The denoiser being trained.
            x: The minibatch's rows of the training data, shape ``(B, *shape)``.
            sigma: Noise levels drawn by the configured law, shape ``(B,)``.
            noise: Standard normal noise, shape ``(B, *shape)``.
            index: The rows' indices into the training data, shape ``(B,)`` (for per-item
                side information such as masks).
            generator: The generator to draw further randomness from (on the training device;
                the run's own, or a per-step one under ``torchrun``).

        Returns:
            The per-sample loss, shape ``(B,)``.
        """
        ...


@dataclasses.dataclass
class TrainResult:
    """What training returns.

    Attributes:
        denoiser: The EMA denoiser, in eval mode (what to sample from).
        losses: The mean loss of every step, over the whole run (resumed runs included).
    """

    denoiser: PreconditionedDenoiser
    losses: list[float]


def _on_device(data: Tensor, device: torch.device) -> Tensor:
    """``data`` on the training device when it fits in a quarter of the free memory, else as it is."""
    if data.device == device or device.type != "cuda":
        return data.to(device)
    free, _ = torch.cuda.mem_get_info(device)
    return data.to(device) if data.numel() * data.element_size() < free // 4 else data


def train(
    denoiser: PreconditionedDenoiser,
    data: Tensor,
    config: TrainConfig | None = None,
    *,
    generator: torch.Generator | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    resume: bool = False,
    metadata: dict[str, Any] | None = None,
    callback: Callable[[int, float], None] | None = None,
    loss: TrainingLoss | None = None,
    until: int | None = None,
) -> TrainResult:
    r"""Train a denoiser on clean samples by denoising score matching (or another loss).

    Each step draws a minibatch of rows, their levels :math:`\sigma` and noise :math:`\epsilon`
    on the training device, and descends the mean loss in the one training loop
    (:func:`cleanprior.training.optimize`: schedule, clipping, EMA, checkpoints, the non-finite
    check, no host synchronisation inside a step).

    Arguments:
        denoiser: The denoiser to train, in place (its device is the training device).
        data: Clean samples, shape ``(N, *shape)``; moved to the training device when it fits
            (a quarter of a GPU's free memory), else minibatches are moved.
        config: The options (defaults of :class:`TrainConfig` when omitted).
        generator: The source of minibatches, noise levels and noise: a generator on the
            training device is used as it is, any other seeds one there (one is seeded from
            torch's default generator when omitted). Its state is checkpointed.
        checkpoint: A file to write every ``config.checkpoint_every`` steps and at the end; it
            holds the EMA denoiser (loadable by :func:`~cleanprior.runs.checkpoint.load_denoiser`)
            and what resumes training.
        resume: Continue from ``checkpoint`` if it exists (same data and options expected).
        metadata: Recorded in the checkpoint (e.g. what the data is).
        callback: Called as ``callback(step, loss)`` for every step, at the loop's reads (every
            ``config.log_every`` steps).
        loss: The per-sample loss, :func:`dsm_loss` when omitted. Methods that learn from
            corrupted data (AmbientDiffusion, SURE-based score matching) put their own here; each
            step it gets a generator of its own, seeded from ``generator``, for the randomness it
            adds (see :class:`TrainingLoss`).
        until: Stop once this many steps are done in all (at most ``config.steps``), with a
            checkpoint there; a later call with ``resume`` goes on from it. The learning-rate
            schedule spans ``config.steps`` whatever the chunks, so training in chunks equals
            training in one go.

    Under ``torchrun`` (:mod:`cleanprior.distributed`), training is data-parallel with the
    minibatches of a single process: every rank draws the whole minibatch (indices, levels,
    noise) from ``generator``, which must be seeded alike on all ranks, computes the loss on its
    rows ``rank::world``, and the gradients are summed across ranks; only rank 0 writes the
    checkpoint.

    Returns:
        The EMA denoiser and the loss history.

    Raises:
        ValueError: If ``data`` is empty, has non-finite values, or does not fit the denoiser.
        FloatingPointError: If the loss or the weights become non-finite (the checkpoint keeps
            the last good state).
    """
    from cleanprior import distributed
    from cleanprior.runs.checkpoint import load_checkpoint, save_denoiser

    config = config or TrainConfig()
    if data.ndim < 2 or data.shape[0] == 0:
        raise ValueError(f"data must have shape (N, *shape) with N > 0, got {tuple(data.shape)}")
    if not torch.isfinite(data).all():
        raise ValueError("training data contain NaN or infinite values")
    device = next(denoiser.parameters()).device
    end = config.steps if until is None else int(until)
    if not 0 <= end <= config.steps:
        raise ValueError(f"until must lie in [0, config.steps = {config.steps}], got {until}")
    amp = config.autocast(device)
    if amp and device.type == "cpu":
        warnings.warn(
            "amp=True on a CPU: bfloat16 convolutions fall back to slow kernels on CPUs without native "
            "bf16 (13x slower than float32 in benchmarks/RESULTS.md); amp pays on GPUs",
            stacklevel=2,
        )
    world, rank = distributed.world_size(), distributed.rank()
    if config.batch_size < world:
        raise ValueError(f"batch_size {config.batch_size} is smaller than the {world} processes sharing it")
    generator = device_generator(generator, device)

    with torch.no_grad():
        denoiser.eval()
        probe = denoiser(data[:1].to(device), torch.ones(1, device=device))
    if probe.shape != data[:1].shape:
        raise ValueError(f"the denoiser maps a sample of shape {tuple(data.shape[1:])} to {tuple(probe.shape[1:])}")

    ema = copy.deepcopy(denoiser).eval().requires_grad_(False)
    path = pathlib.Path(checkpoint) if checkpoint is not None else None
    state = None
    if resume and path is not None and path.exists():
        saved = load_checkpoint(path, map_location=device)
        if saved.get("training") is None:
            raise ValueError(f"{path} holds no training state to resume from")
        state = resume_state(saved)
        if state["generator"].numel() != generator.get_state().numel():
            raise ValueError(f"{path} was trained with its draws on another kind of device; resume it there")

    data = _on_device(data, device)
    model = torch.compile(denoiser) if config.compile else denoiser
    rows = slice(rank, None, world)
    shape = (config.batch_size, *data.shape[1:])

    def step_loss(step: int, repeat: int) -> Tensor:
        # every rank draws the whole minibatch from the same generator and trains on its rows
        index = torch.randint(data.shape[0], (config.batch_size,), generator=generator, device=generator.device)
        sigma = sample_sigma(config, config.batch_size, generator, device)
        eps = torch.randn(shape, generator=generator, device=device, dtype=data.dtype)
        x = data[index[rows].to(data.device)].to(device, non_blocking=True)
        if loss is None:
            per_sample = dsm_loss(model, x, sigma[rows], noise=eps[rows])
        else:
            own = generator
            if world > 1:
                # the loss's own randomness comes from a per-step generator, so that the shared
                # generator stays in step across ranks whatever the loss draws (its seed costs
                # a host synchronisation, as the gradients' all-reduce does anyway)
                seed = int(torch.randint(2**62, (), generator=generator, device=device))
                own = torch.Generator(device=device).manual_seed(seed + rank)
            per_sample = loss(model, x, sigma[rows], eps[rows], index[rows], own)
        return per_sample.sum() / config.batch_size

    def save(current: dict[str, Any]) -> None:
        if path is not None:
            save_denoiser(
                path,
                ema,
                metadata={**(metadata or {}), "config": dataclasses.asdict(config), "step": current["step"]},
                training=current,
            )

    trained = optimize(
        [Update("loss", denoiser, step_loss, config.lr, config.weight_decay, config.clip, ema, config.ema_decay)],
        steps=config.steps,
        generator=generator,
        until=end,
        lr_factor=config.lr_factor,
        amp=amp,
        log_every=config.log_every,
        checkpoint_every=config.checkpoint_every,
        state=state,
        save=save,
        progress=config.progress,
        callback=callback,
    )
    return TrainResult(ema, trained.history.get("loss", []))
