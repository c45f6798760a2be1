r"""SUD and SUD²: reconstruction networks supervised by a denoiser or a diffusion prior.

A reconstruction network :math:`f_\theta` maps observations to images without any forward
model: it learns from a few pairs :math:`(x_p, y_p)`, many unpaired observations :math:`y_u`
and a prior denoiser :math:`D` trained on unpaired clean images, by minimising

.. math:: \mathcal{L} = \mathcal{L}_{\text{paired}} + \lambda_1 \mathcal{L}_{\text{den}}
          + \lambda_2 \mathcal{L}_{\text{reg}}.

- :math:`\mathcal{L}_{\text{paired}} = \operatorname{mean} \|x_p - f(y_p)\|^2`.
- :math:`\mathcal{L}_{\text{den}} = \operatorname{mean} \|f(y_u) - \operatorname{sg}(T)\|^2`
  with a pseudo-label :math:`T` held constant (stop-gradient :math:`\operatorname{sg}`), so that
  its gradient with respect to a reconstruction is

  .. math:: \nabla_{f(y_u)} \mathcal{L}_{\text{den}} = \frac{2\,(f(y_u) - T)}{B n}

  (:math:`B` reconstructions of :math:`n` entries). SUD's label is one denoising step after
  noise injection, :math:`T = D(f(y_u) + \nu_2, \sigma_2)`, :math:`\nu_2 \sim \mathcal{N}(0,
  \sigma_2^2 I)` (:func:`sud_target`); by Tweedie,
  :math:`f - T = -\sigma_2^2 \nabla \log p_{\sigma_2}(f + \nu_2)` up to the injected noise, so the
  loss descends the cross-entropy between the reconstructions and the smoothed prior. SUD²'s label
  runs the reverse diffusion instead: noise :math:`f(y_u)` to the level :math:`\sigma_\star`
  and sample back to 0 with a few steps of any sampler of
  :mod:`cleanprior.diffusion.samplers` (:func:`sud2_target`; one step of DDIM is SUD with
  :math:`\sigma_2 = \sigma_\star`).
- :math:`\mathcal{L}_{\text{reg}}`, against the mode collapse that the cross-entropy encourages:
  the mean absolute correlation between the latent vectors of different reconstructions in a
  batch (:func:`decorrelation_loss`), read by a forward hook on an encoder module
  (:class:`LatentHook`; the U-Net's bottleneck ``middle`` by default).

Both means run over the batch and the entries (so the weights do not depend on the image
size). No function here takes an operator: the forward model may be unknown.

**Linear-Gaussian check.** With :math:`x \sim \mathcal{N}(0, I)`, the exact denoiser
:math:`D(z, \sigma) = z / (1 + \sigma^2)` and a linear :math:`f(y) = W y`, the expected SUD
gradient vanishes at

.. math:: W^\star = M_{xy}^p \big(M_{yy}^p + \lambda_1 c\, M_{yy}^u\big)^{-1}, \qquad
          c = \frac{\sigma_2^2}{1 + \sigma_2^2},

with :math:`M^p_{xy}, M^p_{yy}` the second moments of the pairs and :math:`M^u_{yy}` that of the
unpaired observations (the injected noise averages out). It is the least-squares fit shrunk
towards 0, the prior's mode; a linear SUD² label :math:`T = \rho\, (f + \sigma_\star z)` gives
:math:`c = 1 - \rho`.

References:
    Chan, Young & Metzler (2023). SUD²: Supervision by Denoising Diffusion Models for Image
    Reconstruction. NeurIPS workshop. https://arxiv.org/abs/2303.09642 (eqs. 1-3, 8, 9).
    Young, Dalca, Ferrante, Golland, Fischl & Iglesias (2022). SUD: Supervision by Denoising for
    Medical Image Segmentation. https://arxiv.org/abs/2202.02952
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from cleanprior.diffusion.denoiser import Denoiser
from cleanprior.diffusion.schedules import SIGMA_MIN

__all__ = [
    "METHODS",
    "LatentHook",
    "ReconstructionResult",
    "SUDConfig",
    "decorrelation_loss",
    "pseudo_label_loss",
    "sud2_target",
    "sud_target",
    "train_reconstruction",
]

METHODS = ("supervised", "sud", "sud2")
"""The training methods: the paired loss alone, with SUD's denoiser label, or with SUD²'s."""


def pseudo_label_loss(output: Tensor, target: Tensor) -> Tensor:
    r""":math:`\operatorname{mean} \|f - \operatorname{sg}(T)\|^2` over the batch and the entries.

    Its gradient with respect to ``output`` is :math:`2 (f - T) / (B n)`; none reaches
    ``target``.

    Arguments:
        output: Reconstructions :math:`f(y_u)`, shape ``(B, *shape)``.
        target: Pseudo-labels :math:`T`, shape ``(B, *shape)``.

    Returns:
        The loss, a scalar.
    """
    if output.shape != target.shape:
        raise ValueError(
            f"output {tuple(output.shape)} and target {tuple(target.shape)} must have the same shape"
        )
    return (output - target.detach()).pow(2).mean()


@torch.no_grad()
def sud_target(output: Tensor, prior: Denoiser, sigma_2: float, noise: Tensor) -> Tensor:
    r"""SUD's pseudo-label :math:`T = D(f + \sigma_2 z, \sigma_2)`, without gradient.

    Arguments:
        output: Reconstructions :math:`f(y_u)`, shape ``(B, *shape)``.
        prior: The prior denoiser ``D(x_t, sigma)``.
        sigma_2: :math:`\sigma_2 > 0`, the injected noise's level and the denoiser's.
        noise: :math:`z`, standard normal, shape ``(B, *shape)`` (:math:`\nu_2 = \sigma_2 z`).

    Returns:
        :math:`T`, shape ``(B, *shape)``, detached.
    """
    if not sigma_2 > 0:
        raise ValueError(f"sigma_2 must be positive, got {sigma_2}")
    if noise.shape != output.shape:
        raise ValueError(
            f"noise must have the shape of the output {tuple(output.shape)}, got {tuple(noise.shape)}"
        )
    x = output.detach()
    sigma = torch.full((x.shape[0],), float(sigma_2), dtype=x.dtype, device=x.device)
    return prior(x + sigma_2 * noise, sigma).detach()


@torch.no_grad()
def sud2_target(
    output: Tensor,
    prior: Denoiser,
    sigma_star: float,
    noise: Tensor,
    *,
    steps: int = 8,
    sampler: str = "ddpm",
    sigma_min: float = SIGMA_MIN,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""SUD²'s pseudo-label: :math:`f + \sigma_\star z` diffused back to level 0, without gradient.

    The reverse diffusion runs on the EDM grid from :math:`\sigma_\star` down to ``sigma_min``,
    then to 0, in ``steps`` steps (the CCDF-style shortcut of
    :meth:`~cleanprior.diffusion.samplers.Sampler.__call__`). With ``steps=1`` and a
    deterministic sampler this is :func:`sud_target` at :math:`\sigma_2 = \sigma_\star`.

    Arguments:
        output: Reconstructions :math:`f(y_u)`, shape ``(B, *shape)``.
        prior: The prior denoiser ``D(x_t, sigma)``.
        sigma_star: :math:`\sigma_\star`, the level the reconstructions are noised to; above
            ``sigma_min``.
        noise: :math:`z`, standard normal, shape ``(B, *shape)``.
        steps: Sampler steps.
        sampler: A sampler's name (``ddim``, ``ddpm``, ``euler``, ``heun``, ``pc``).
        sigma_min: The grid's last non-zero level.
        generator: The randomness of stochastic samplers (on the output's device).

    Returns:
        :math:`T`, shape ``(B, *shape)``, detached.
    """
    from cleanprior.diffusion.samplers import get_sampler
    from cleanprior.diffusion.schedules import make_grid

    if not sigma_star > sigma_min > 0:
        raise ValueError(
            f"sigma_star must exceed sigma_min > 0, got sigma_star={sigma_star}, sigma_min={sigma_min}"
        )
    if noise.shape != output.shape:
        raise ValueError(
            f"noise must have the shape of the output {tuple(output.shape)}, got {tuple(noise.shape)}"
        )
    runner = get_sampler(sampler)
    grid = make_grid(steps, sigma_min, sigma_star)
    return runner(prior, output.detach() + sigma_star * noise, grid, generator=generator).detach()


def decorrelation_loss(latents: Tensor) -> Tensor:
    r"""The mean absolute correlation between the latent vectors of different samples.

    With :math:`h_i` the flattened latent of sample :math:`i` and
    :math:`\bar h_i = (h_i - \operatorname{mean}(h_i)) / \|h_i - \operatorname{mean}(h_i)\|`,

    .. math:: \mathcal{L}_{\text{reg}} = \frac{1}{B (B - 1)} \sum_{i \neq j}
              |\bar h_i^\top \bar h_j| \in [0, 1],

    1 exactly when all latents are equal up to scale and offset (collapse), and of order
    :math:`\sqrt{2 / (\pi m)}` for independent random latents of :math:`m` entries. A constant
    latent has no direction and counts as uncorrelated; a batch of one sample gives 0.

    Arguments:
        latents: Shape ``(B, *latent_shape)``.

    Returns:
        The loss, a differentiable scalar.
    """
    if latents.ndim < 2:
        raise ValueError(f"latents must have shape (B, *latent_shape), got {tuple(latents.shape)}")
    h = latents.flatten(1)
    batch = h.shape[0]
    if batch < 2:
        return h.sum() * 0
    h = h - h.mean(1, keepdim=True)
    h = h / h.norm(dim=1, keepdim=True).clamp_min(torch.finfo(h.dtype).tiny ** 0.5)
    correlation = h @ h.T
    off = ~torch.eye(batch, dtype=torch.bool, device=h.device)
    return correlation[off].abs().mean()


class LatentHook:
    r"""Records the output of one module of a network at every forward pass (a forward hook).

    Use as a context manager around the forward passes; :attr:`latents` then holds the last
    output, in the autograd graph. A ``ModuleList`` (never called itself, as ``UNet.middle``)
    stands for its last element; a module returning a tuple contributes its first element.

    Arguments:
        network: The network.
        module: The module's qualified name in ``network`` (``"middle"``, ``"encoder.1.0"``) or
            the module itself.

    Raises:
        ValueError: If ``network`` has no such module.
    """

    def __init__(self, network: nn.Module, module: str | nn.Module = "middle") -> None:
        if isinstance(module, str):
            try:
                target = network.get_submodule(module)
            except AttributeError:
                raise ValueError(
                    f"{type(network).__name__} has no module {module!r} to read latents from; give the "
                    "qualified name of an encoder module (see network.named_modules())"
                ) from None
        else:
            target = module
        while isinstance(target, nn.ModuleList):
            if len(target) == 0:
                raise ValueError(f"the latent module {module!r} is an empty ModuleList")
            target = target[-1]
        self.module = target
        self.latents: Tensor | None = None
        self._handle: Any = None

    def _record(self, module: nn.Module, inputs: Any, output: Any) -> None:
        self.latents = output[0] if isinstance(output, (tuple, list)) else output

    def __enter__(self) -> LatentHook:
        self._handle = self.module.register_forward_hook(self._record)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._handle.remove()
        self._handle = None


@dataclasses.dataclass
class SUDConfig:
    r"""Options of :func:`train_reconstruction`.

    Attributes:
        method: ``"supervised"`` (the paired loss alone, the baseline), ``"sud"`` or
            ``"sud2"``.
        lambda_1: :math:`\lambda_1 \geq 0`, the weight of the pseudo-label loss.
        lambda_2: :math:`\lambda_2 \geq 0`, the weight of the latent decorrelation.
        sigma_2: :math:`\sigma_2 > 0`, SUD's injected noise and denoiser level.
        sigma_star: :math:`\sigma_\star`, SUD²'s noising level.
        sud2_steps: SUD²'s sampler steps from :math:`\sigma_\star` to 0.
        sampler: SUD²'s sampler (DDPM, as in the paper, by default).
        sigma_min: SUD²'s last non-zero level.
        steps: Optimiser steps.
        warmup: The first steps train on the pairs alone; the pseudo-label and decorrelation
            terms switch on after them. Without it the prior's targets are taken from an
            untrained network's outputs and pull the network towards the prior's modes before
            the pairs have taught it what to reconstruct (the collapse of SUD); with it the
            targets refine reconstructions that already follow the pairs, as semi-supervised
            training ramps up its unsupervised weight.
        batch_paired: Pairs per step.
        batch_unpaired: Unpaired observations per step.
        lr: AdamW's peak learning rate.
        lr_schedule: ``"constant"`` or ``"cosine"`` (decay to 0).
        weight_decay: AdamW's decoupled weight decay.
        clip: Maximum gradient norm (``0`` disables clipping).
        ema_decay: Decay of the weights' exponential moving average in [0, 1); 0 returns the
            trained weights themselves.
        latent: The module whose output :math:`\mathcal{L}_{\text{reg}}` decorrelates (see
            :class:`LatentHook`).
        checkpoint_every: Steps between checkpoints (when a checkpoint path is given).

    Minibatches are drawn without replacement within a step (with replacement only when a set
    is smaller than its batch), so that no two rows of a batch are the same sample and
    :math:`\mathcal{L}_{\text{reg}}` never sees a forced correlation of 1.
    """

    method: str = "sud2"
    lambda_1: float = 1.0
    lambda_2: float = 0.1
    sigma_2: float = 0.2
    sigma_star: float = 0.5
    sud2_steps: int = 8
    sampler: str = "ddpm"
    sigma_min: float = SIGMA_MIN
    steps: int = 5000
    warmup: int = 0
    batch_paired: int = 8
    batch_unpaired: int = 32
    lr: float = 1e-3
    lr_schedule: str = "cosine"
    weight_decay: float = 0.0
    clip: float = 1.0
    ema_decay: float = 0.0
    latent: str = "middle"
    checkpoint_every: int = 500

    def __post_init__(self) -> None:
        from cleanprior.diffusion.samplers import SAMPLERS

        if self.method not in METHODS:
            raise ValueError(
                f"SUDConfig.method must be one of {list(METHODS)}, got {self.method!r}"
            )
        for name in ("sud2_steps", "steps", "batch_paired", "batch_unpaired", "checkpoint_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"SUDConfig.{name} must be a positive integer, got {value!r}")
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or self.warmup < 0:
            raise ValueError(f"SUDConfig.warmup must be a non-negative integer, got {self.warmup!r}")
        if self.method != "supervised" and self.warmup >= self.steps:
            raise ValueError(
                f"SUDConfig.warmup ({self.warmup}) must be below steps ({self.steps}), or the "
                f"{self.method} terms never switch on"
            )
        for name in ("lambda_1", "lambda_2", "weight_decay", "clip"):
            if not getattr(self, name) >= 0:
                raise ValueError(
                    f"SUDConfig.{name} must be non-negative, got {getattr(self, name)}"
                )
        if not self.sigma_2 > 0:
            raise ValueError(f"SUDConfig.sigma_2 must be positive, got {self.sigma_2}")
        if not self.sigma_star > self.sigma_min > 0:
            raise ValueError(
                f"SUDConfig needs sigma_star > sigma_min > 0, got sigma_star={self.sigma_star}, sigma_min={self.sigma_min}"
            )
        if self.sampler not in SAMPLERS:
            raise ValueError(
                f"SUDConfig.sampler must be one of {sorted(SAMPLERS)}, got {self.sampler!r}"
            )
        if not self.lr > 0:
            raise ValueError(f"SUDConfig.lr must be positive, got {self.lr}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(
                f"SUDConfig.lr_schedule must be 'constant' or 'cosine', got {self.lr_schedule!r}"
            )
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"SUDConfig.ema_decay must lie in [0, 1), got {self.ema_decay}")

    def lr_factor(self, step: int) -> float:
        """The learning-rate multiplier at ``step`` (0-based)."""
        if self.lr_schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * step / self.steps))
        return 1.0


@dataclasses.dataclass
class ReconstructionResult:
    r"""What :func:`train_reconstruction` returns.

    Attributes:
        network: The trained network (its EMA when ``ema_decay > 0``), in eval mode.
        history: Per step, over the whole run (resumed runs included): ``"loss"`` (the
            total), ``"paired"``, ``"den"`` and ``"reg"`` (the three terms, unweighted; 0 for
            the terms a method does not use).
    """

    network: nn.Module
    history: dict[str, list[float]]


def _check_data(
    pairs: tuple[Tensor, Tensor], unpaired: Tensor | None, prior: Denoiser | None, config: SUDConfig
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Validate the training data against the method (before any work)."""
    if not isinstance(pairs, (tuple, list)) or len(pairs) != 2:
        raise ValueError("pairs must be a tuple (x_p, y_p) of clean images and their observations")
    x_p, y_p = pairs
    if x_p.ndim < 2 or y_p.ndim < 2 or x_p.shape[0] == 0 or x_p.shape[0] != y_p.shape[0]:
        raise ValueError(
            f"pairs must hold as many clean images (N, *x_shape) as observations (N, *y_shape), N > 0; "
            f"got x_p {tuple(x_p.shape)} and y_p {tuple(y_p.shape)}"
        )
    for name, tensor in (("x_p", x_p), ("y_p", y_p)):
        if not torch.isfinite(tensor).all():
            raise ValueError(f"the pairs' {name} contain NaN or infinite values")
    if config.method == "supervised":
        return x_p, y_p, None
    if prior is None:
        raise ValueError(f"method {config.method!r} needs a prior denoiser")
    if unpaired is None or unpaired.shape[0] == 0:
        raise ValueError(f"method {config.method!r} needs unpaired observations y_u")
    if unpaired.shape[1:] != y_p.shape[1:]:
        raise ValueError(
            f"the unpaired observations {tuple(unpaired.shape)} must have the paired ones' shape (N, {', '.join(map(str, y_p.shape[1:]))})"
        )
    if not torch.isfinite(unpaired).all():
        raise ValueError("the unpaired observations y_u contain NaN or infinite values")
    return x_p, y_p, unpaired


def _draw(n: int, batch: int, generator: torch.Generator) -> Tensor:
    """Indices of a minibatch: without replacement when the set is large enough."""
    if batch <= n:
        return torch.randperm(n, generator=generator)[:batch]
    return torch.randint(n, (batch,), generator=generator)


def _unpaired_terms(
    f: nn.Module,
    y_u: Tensor,
    z: Tensor,
    prior: Denoiser,
    config: SUDConfig,
    hook: LatentHook | None,
    generator: torch.Generator,
) -> tuple[Tensor, Tensor]:
    """The pseudo-label loss and the decorrelation of one unpaired minibatch."""
    if hook is None:
        output, reg = f(y_u), torch.zeros((), device=y_u.device)
    else:
        with hook:
            output = f(y_u)
        reg = decorrelation_loss(hook.latents)
    if config.method == "sud":
        target = sud_target(output, prior, config.sigma_2, z)
    else:
        # stochastic samplers draw on the data's device, from a generator seeded by the CPU one
        own = torch.Generator(device=output.device)
        own.manual_seed(int(torch.randint(2**62, (), generator=generator)))
        target = sud2_target(
            output,
            prior,
            config.sigma_star,
            z,
            steps=config.sud2_steps,
            sampler=config.sampler,
            sigma_min=config.sigma_min,
            generator=own,
        )
    return pseudo_label_loss(output, target), reg


def train_reconstruction(
    f: nn.Module,
    pairs: tuple[Tensor, Tensor],
    unpaired: Tensor | None = None,
    prior: Denoiser | None = None,
    config: SUDConfig | None = None,
    *,
    generator: torch.Generator | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    resume: bool = False,
    progress: bool = True,
    callback: Callable[[int, float], None] | None = None,
) -> ReconstructionResult:
    r"""Train a reconstruction network by the paired loss, SUD or SUD².

    Each step draws a minibatch of pairs and, except for ``"supervised"``, one of unpaired
    observations with its noise :math:`z` (and a generator for a stochastic sampler), then
    descends :math:`\mathcal{L}_{\text{paired}} + \lambda_1 \mathcal{L}_{\text{den}} +
    \lambda_2 \mathcal{L}_{\text{reg}}` with AdamW. The prior is only evaluated, without
    gradient: pass it in eval mode.

    Arguments:
        f: The network :math:`f_\theta`, trained in place: any module mapping observations
            ``(B, *y_shape)`` to images ``(B, *x_shape)``, e.g. ``UNet(noise_conditioning=False)``.
            Its device is the training device.
        pairs: ``(x_p, y_p)``, shapes ``(N_p, *x_shape)`` and ``(N_p, *y_shape)``.
        unpaired: :math:`y_u`, shape ``(N_u, *y_shape)`` (unused by ``"supervised"``).
        prior: The prior denoiser ``D(x_t, sigma)`` on images (unused by ``"supervised"``).
        config: The options (the defaults of :class:`SUDConfig` when omitted).
        generator: The source of minibatches and noise (a CPU generator; one is seeded from
            torch's default generator when omitted).
        checkpoint: A file written every ``config.checkpoint_every`` steps and at the end
            (atomically), holding the network (its EMA when used), what rebuilds it
            (``network``: class name and ``config`` when the network has one) and what resumes
            training.
        resume: Continue from ``checkpoint`` if it exists (same data and options expected).
        progress: Show a progress bar with the loss.
        callback: Called as ``callback(step, loss)`` after every step.

    Returns:
        The trained network and the loss history.

    Raises:
        ValueError: If the data do not fit each other or the method, ``f`` does not map an
            observation to an image's shape, the latent module does not exist, or the
            checkpoint was written with other options.
    """
    from cleanprior.learning.loop import check_network, make_generator, train_network

    config = config or SUDConfig()
    x_p, y_p, y_u = _check_data(pairs, unpaired, prior, config)
    generator = make_generator(generator, "train_reconstruction")
    unsupervised = config.method != "supervised"
    hook = LatentHook(f, config.latent) if unsupervised and config.lambda_2 > 0 else None
    if hook is None:
        device = check_network(f, y_p[:1], x_p[:1].shape, "reconstruction network f", "an image")
    else:
        with hook:
            device = check_network(f, y_p[:1], x_p[:1].shape, "reconstruction network f", "an image")
        if hook.latents is None:
            raise ValueError(
                f"the latent module {config.latent!r} is not called by f's forward pass"
            )
        hook.latents = None

    def loss(step: int) -> dict[str, Tensor]:
        rows = _draw(x_p.shape[0], config.batch_paired, generator)
        paired = pseudo_label_loss(f(y_p[rows].to(device)), x_p[rows].to(device))
        den = reg = torch.zeros((), device=device)
        if unsupervised and step >= config.warmup:
            rows_u = _draw(y_u.shape[0], config.batch_unpaired, generator)
            z = torch.randn(
                (config.batch_unpaired, *x_p.shape[1:]), generator=generator, dtype=x_p.dtype
            )
            den, reg = _unpaired_terms(
                f, y_u[rows_u].to(device), z.to(device), prior, config, hook, generator
            )
        total = paired + config.lambda_1 * den + config.lambda_2 * reg
        return {"loss": total, "paired": paired, "den": den, "reg": reg}

    network, history = train_network(
        f,
        loss,
        config,
        kind="reconstruction",
        generator=generator,
        checkpoint=checkpoint,
        resume=resume,
        progress=progress,
        callback=callback,
    )
    return ReconstructionResult(network, history)
