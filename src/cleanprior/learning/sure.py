r"""Stein's unbiased risk estimate (SURE) and SURE-based score training from noisy data.

For :math:`y = x + \sigma n`, :math:`n \sim \mathcal{N}(0, I_n)`, and a weakly differentiable
:math:`F`, Stein's lemma gives an estimate of the error of :math:`F(y)` that never sees
:math:`x`,

.. math::
    \operatorname{SURE}(F, y) = \|y - F(y)\|^2 + 2 \sigma^2 \operatorname{div}_y F(y) - n \sigma^2,
    \qquad E\big[\operatorname{SURE}(F, y)\big] = E\,\|F(y) - x\|^2,

with the divergence :math:`\operatorname{div}_y F = \operatorname{tr} \partial F / \partial y`
estimated by Monte Carlo from one finite difference along a Gaussian probe,

.. math::
    \operatorname{div}_y F(y) \approx
        \frac{1}{\varepsilon} b^\top \big(F(y + \varepsilon b) - F(y)\big),
    \qquad b \sim \mathcal{N}(0, I_n),

unbiased as :math:`\varepsilon \to 0` since :math:`E[b^\top J b] = \operatorname{tr} J`.

**SURE-based score training** (:class:`SURELoss`). With noisy data :math:`y = x + \sigma_y n`
only, a drawn level :math:`s` is mapped to :math:`\sigma = \sqrt{\sigma_y^2 + s^2}`; then
:math:`y_t = y + s \epsilon` is :math:`x` plus Gaussian noise of standard deviation
:math:`\sigma`, and SURE estimates the denoising loss of :math:`D(\cdot, \sigma)` at
:math:`y_t`, whose minimiser is :math:`E[x \mid x + \sigma \epsilon]`: the clean prior's denoiser
at every level above :math:`\sigma_y`. This is GSURE-diffusion (Kawar et al. 2023) for
:math:`A = I`; SURE-Score (Aali et al. 2023) instead couples a SURE denoising loss at
:math:`\sigma_y` with denoising score matching on the denoised estimates, in one network.

References:
    Stein (1981). Estimation of the Mean of a Multivariate Normal Distribution.
    Ramani, Blu & Unser (2008). Monte-Carlo SURE: A Black-Box Optimization of Regularization
    Parameters for General Denoising Algorithms.
    Metzler, Mousavi, Heckel & Baraniuk (2018). Unsupervised Learning with Stein's Unbiased
    Risk Estimator. https://arxiv.org/abs/1805.10531
    Kawar, Elata, Michaeli & Elad (2023). GSURE-Based Diffusion Model Training with Corrupted
    Data. https://arxiv.org/abs/2305.13128
    Aali, Arvinte, Kumar & Tamir (2023). Solving Inverse Problems with Score-Based Generative
    Priors Learned from Noisy Data (SURE-Score). https://arxiv.org/abs/2305.01166
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable

import torch
from torch import Tensor, nn

from cleanprior.diffusion.denoiser import Denoiser, batch_sigma, expand_sigma
from cleanprior.diffusion.precondition import PreconditionedDenoiser
from cleanprior.diffusion.training import dsm_weight

__all__ = [
    "SUREConfig",
    "SUREDenoiser",
    "SURELoss",
    "SUREResult",
    "divergence",
    "sure",
    "train_sure_denoiser",
]

# The default finite-difference step relative to the largest magnitude of each sample (Metzler
# et al. 2018): small against the data's variations, large against float32 rounding of F.
RELATIVE_EPSILON = 1e-3


def _per_sample(value: float | Tensor, y: Tensor, name: str) -> Tensor:
    """A positive scalar or one value per sample as a tensor of shape ``(B,)``.

    Raises:
        ValueError: If ``value`` has another shape or is not positive and finite.
    """
    value = torch.as_tensor(value, device=y.device, dtype=y.dtype)
    if value.ndim > 1 or (value.ndim == 1 and value.shape[0] not in (1, y.shape[0])):
        raise ValueError(
            f"{name} must be a float or one value per sample ({y.shape[0]},), "
            f"got shape {tuple(value.shape)}"
        )
    if not (torch.isfinite(value).all() and (value > 0).all()):
        raise ValueError(f"{name} must be positive and finite")
    return value.reshape(-1).expand(y.shape[0])


def divergence(
    F: Callable[[Tensor], Tensor],
    y: Tensor,
    generator: torch.Generator | None = None,
    epsilon: float | Tensor | None = None,
    probes: int = 1,
    output: Tensor | None = None,
) -> Tensor:
    r"""The Monte-Carlo divergence :math:`\operatorname{div}_y F(y)`, one value per sample.

    .. math::
        \widehat{\operatorname{div}}_i = \frac{1}{K} \sum_{k=1}^{K}
            \frac{1}{\varepsilon_i} b_{ik}^\top \big(F(y + \varepsilon b_k)_i - F(y)_i\big),
        \qquad b_{ik} \sim \mathcal{N}(0, I_n).

    For a linear :math:`F(y) = W y` each term is exactly :math:`b^\top W b`, of mean
    :math:`\operatorname{tr} W` and variance :math:`2 \|(W + W^\top)/2\|_F^2`; in general the
    finite difference adds a bias of order :math:`\varepsilon`. The result is differentiable
    with respect to the parameters of :math:`F` (for training).

    Arguments:
        F: A map from a batch to a batch of the same shape, ``(B, *shape) -> (B, *shape)``,
            acting on each sample separately.
        y: The point, shape ``(B, *shape)``.
        generator: The source of the probes :math:`b`.
        epsilon: The step :math:`\varepsilon`, a float or shape ``(B,)``; by default
            :math:`10^{-3} \max_j |y_{ij}|` per sample (:math:`10^{-3}` for a sample of zeros),
            which follows the scale of the data.
        probes: The number :math:`K \geq 1` of probes averaged.
        output: :math:`F(y)` when already computed, shape ``(B, *shape)`` (saves one call).

    Returns:
        The divergence estimates, shape ``(B,)``.

    Raises:
        ValueError: If ``probes`` is not positive, ``epsilon`` is not positive or does not fit
            the batch, or ``F`` changes the shape.
    """
    if probes < 1:
        raise ValueError(f"probes must be positive, got {probes}")
    if epsilon is None:
        scale = y.detach().abs().flatten(1).amax(1)
        step = RELATIVE_EPSILON * torch.where(scale > 0, scale, torch.ones_like(scale))
    else:
        step = _per_sample(epsilon, y, "epsilon")
    base = F(y) if output is None else output
    if base.shape != y.shape:
        raise ValueError(
            f"F must map a batch of shape {tuple(y.shape)} to the same shape, "
            f"got {tuple(base.shape)}"
        )
    view = expand_sigma(step, y)
    total = torch.zeros(y.shape[0], device=y.device, dtype=base.dtype)
    for _ in range(probes):
        b = torch.randn(y.shape, generator=generator, device=y.device, dtype=y.dtype)
        total = total + (b * (F(y + view * b) - base)).flatten(1).sum(1) / step
    return total / probes


def sure(
    F: Callable[[Tensor], Tensor],
    y: Tensor,
    noise_std: float | Tensor,
    generator: torch.Generator | None = None,
    *,
    epsilon: float | Tensor | None = None,
    probes: int = 1,
    per_entry: bool = False,
) -> Tensor:
    r"""Stein's unbiased estimate of :math:`\|F(y) - x\|^2` for :math:`y = x + \sigma n`.

    .. math::
        \operatorname{SURE}_i = \|y_i - F(y)_i\|^2 + 2 \sigma_i^2\, \widehat{\operatorname{div}}_i
            - n \sigma_i^2,

    with the Monte-Carlo divergence of :func:`divergence` and :math:`n` the entries of a sample.
    Unbiased (up to the finite difference's :math:`O(\varepsilon)`) for any weakly
    differentiable :math:`F`; a single estimate can be negative.

    Arguments:
        F: A map ``(B, *shape) -> (B, *shape)`` acting on each sample separately (a denoiser at
            a fixed level, a reconstruction network, ...).
        y: The noisy samples, shape ``(B, *shape)``.
        noise_std: :math:`\sigma`, a float or shape ``(B,)``; positive.
        generator: The source of the divergence's probes.
        epsilon: The finite-difference step (see :func:`divergence`).
        probes: The number of probes of the divergence.
        per_entry: Divide by :math:`n`, an estimate of the mean squared error per entry.

    Returns:
        The estimates, shape ``(B,)``.

    Raises:
        ValueError: If ``noise_std`` is not positive or does not fit the batch, or an argument
            of :func:`divergence` is invalid.
    """
    sigma = _per_sample(noise_std, y, "noise_std")
    if probes < 1:
        raise ValueError(f"probes must be positive, got {probes}")
    if epsilon is not None:
        epsilon = _per_sample(epsilon, y, "epsilon")
    n = math.prod(y.shape[1:])
    output = F(y)
    div = divergence(F, y, generator, epsilon=epsilon, probes=probes, output=output)
    residual = (y - output).flatten(1).pow(2).sum(1)
    estimate = residual + 2 * sigma**2 * div - n * sigma**2
    return estimate / n if per_entry else estimate


class SURELoss:
    r"""SURE-based denoising score matching from noisy data.

    A :class:`~cleanprior.diffusion.training.TrainingLoss` for
    :func:`~cleanprior.diffusion.training.train`.

    The data are :math:`y = x + \sigma_y n` (:math:`A = I`). A drawn level :math:`s` becomes the
    total level :math:`\sigma = \sqrt{\sigma_y^2 + s^2}`, :math:`y_t = y + s \epsilon`, and

    .. math::
        \ell = w(\sigma)\, \tfrac{1}{n} \operatorname{SURE}\big(D(\cdot, \sigma), y_t\big),
        \qquad w(\sigma) = \frac{1}{\sigma^2} + \frac{1}{\sigma_d^2},

    the weight of :func:`~cleanprior.diffusion.training.dsm_loss`. Its expectation is the
    weighted denoising loss of clean-data training at level :math:`\sigma`, so the minimiser is
    the clean denoiser :math:`E[x \mid x_t]` for every :math:`\sigma > \sigma_y`. Every level
    is kept (mapped rather than resampled); levels drawn far below :math:`\sigma_y` all train
    the denoiser near :math:`\sigma_y`. Each sample costs ``1 + probes`` network evaluations.

    Arguments:
        noise_std: :math:`\sigma_y`, a float or one value per training item, shape ``(N,)``
            (picked by ``index``); positive.
        probes: The probes of the Monte-Carlo divergence.
        epsilon: Its finite-difference step (the data-scaled default of :func:`divergence`
            when ``None``).

    Raises:
        ValueError: If ``noise_std`` is not positive and finite or ``probes`` is not positive.

    References:
        Kawar et al. (2023). GSURE-Based Diffusion Model Training with Corrupted Data.
        https://arxiv.org/abs/2305.13128
        Aali et al. (2023). Solving Inverse Problems with Score-Based Generative Priors Learned
        from Noisy Data. https://arxiv.org/abs/2305.01166
    """

    def __init__(
        self, noise_std: float | Tensor, probes: int = 1, epsilon: float | None = None
    ) -> None:
        noise_std = torch.as_tensor(noise_std, dtype=torch.float64).detach().cpu()
        if noise_std.ndim > 1:
            raise ValueError(
                "noise_std must be a float or one value per item (N,), "
                f"got shape {tuple(noise_std.shape)}"
            )
        if not (torch.isfinite(noise_std).all() and (noise_std > 0).all()):
            raise ValueError("noise_std must be positive and finite")
        if probes < 1:
            raise ValueError(f"probes must be positive, got {probes}")
        if epsilon is not None and not epsilon > 0:
            raise ValueError(f"epsilon must be positive, got {epsilon}")
        self.noise_std = noise_std
        self.probes = int(probes)
        self.epsilon = epsilon

    def __call__(
        self,
        denoiser: PreconditionedDenoiser,
        x: Tensor,
        sigma: Tensor,
        noise: Tensor,
        index: Tensor,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        r"""The loss of each sample of a minibatch.

        Arguments:
            denoiser: The denoiser being trained.
            x: Noisy observations :math:`y`, shape ``(B, *shape)``.
            sigma: Drawn levels :math:`s`, shape ``(B,)``.
            noise: Standard normal noise, shape ``(B, *shape)``.
            index: The rows' indices into the training data, shape ``(B,)`` (for per-item
                :math:`\sigma_y`).
            generator: The source of the divergence's probes (on the device of ``x``).

        Returns:
            The per-sample loss, shape ``(B,)``.

        Raises:
            ValueError: If ``index`` falls outside a per-item ``noise_std``.
        """
        if self.noise_std.ndim == 1:
            if index.numel() and not (
                0 <= int(index.min()) and int(index.max()) < self.noise_std.shape[0]
            ):
                raise ValueError(
                    f"index must lie in [0, {self.noise_std.shape[0]}): noise_std has one value "
                    "per item"
                )
            noise_std = self.noise_std[index.cpu()]
        else:
            noise_std = self.noise_std.expand(x.shape[0])
        noise_std = noise_std.to(x.device, sigma.dtype)
        total = torch.sqrt(noise_std**2 + sigma**2)
        y_t = x + expand_sigma(sigma, x) * noise
        # a finite difference of relative size 1e-3 is lost in bfloat16's 8 bits of mantissa
        with torch.autocast(x.device.type, enabled=False):
            risk = sure(
                lambda z: denoiser(z, total),
                y_t,
                total,
                generator,
                epsilon=self.epsilon,
                probes=self.probes,
                per_entry=True,
            )
        weight = dsm_weight(total, denoiser.sigma_data)
        return weight * risk.float()


class SUREDenoiser(nn.Module):
    r"""A denoiser trained by :class:`SURELoss`, for sampling: levels clamped to :math:`\sigma_y`.

    .. math:: D(x_t, \sigma) = D_\theta(x_t, \max(\sigma, \sigma_y)).

    SURE training only reaches levels above :math:`\sigma_y`; below, the network's output is
    whatever it extrapolates to. Clamping makes a sampler's last steps use the estimate at
    :math:`\sigma_y`, :math:`E[x \mid x_t]` as if :math:`x_t` still carried noise
    :math:`\sigma_y`: slightly smoother samples than the prior's, never out-of-range levels.

    Arguments:
        denoiser: The trained denoiser, any callable ``(x_t, sigma)``.
        noise_std: :math:`\sigma_y` (the smallest one, if it varied between items); positive.

    Raises:
        ValueError: If ``noise_std`` is not positive and finite.
    """

    def __init__(self, denoiser: Denoiser, noise_std: float) -> None:
        super().__init__()
        value = float(noise_std)
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"noise_std must be positive and finite, got {noise_std}")
        self.denoiser = denoiser
        self.noise_std = value

    def forward(self, x_t: Tensor, sigma: Tensor | float) -> Tensor:
        r"""Estimate :math:`E[x \mid x_t]` at the level :math:`\max(\sigma, \sigma_y)`.

        Arguments:
            x_t: Noisy samples, shape ``(B, *shape)``.
            sigma: Noise levels, broadcastable to ``(B,)``.

        Returns:
            The estimate, shape ``(B, *shape)``.
        """
        return self.denoiser(x_t, batch_sigma(sigma, x_t).clamp_min(self.noise_std))


@dataclasses.dataclass
class SUREConfig:
    r"""Options of :func:`train_sure_denoiser`.

    Attributes:
        steps: Optimiser steps.
        batch_size: Noisy samples per step (drawn with replacement).
        lr: AdamW's peak learning rate.
        lr_schedule: ``"constant"`` or ``"cosine"`` (decay to 0).
        weight_decay: AdamW's decoupled weight decay.
        clip: Maximum gradient norm (``0`` disables clipping).
        probes: The probes of the Monte-Carlo divergence (each costs one more forward pass).
        epsilon: The divergence's finite-difference step; ``None`` for the data-scaled default
            of :func:`divergence`.
        checkpoint_every: Steps between checkpoints (when a checkpoint path is given).
    """

    steps: int = 5000
    batch_size: int = 32
    lr: float = 1e-3
    lr_schedule: str = "cosine"
    weight_decay: float = 0.0
    clip: float = 1.0
    probes: int = 1
    epsilon: float | None = None
    checkpoint_every: int = 500

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "probes", "checkpoint_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"SUREConfig.{name} must be a positive integer, got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"SUREConfig.lr must be positive, got {self.lr}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(
                f"SUREConfig.lr_schedule must be 'constant' or 'cosine', got {self.lr_schedule!r}"
            )
        if self.weight_decay < 0 or self.clip < 0:
            raise ValueError("SUREConfig.weight_decay and SUREConfig.clip must be non-negative")
        if self.epsilon is not None and not self.epsilon > 0:
            raise ValueError(f"SUREConfig.epsilon must be positive or None, got {self.epsilon}")

    def lr_factor(self, step: int) -> float:
        """The learning-rate multiplier at ``step`` (0-based)."""
        if self.lr_schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * step / self.steps))
        return 1.0


@dataclasses.dataclass
class SUREResult:
    r"""What :func:`train_sure_denoiser` returns.

    Attributes:
        network: The trained denoiser :math:`F`, in eval mode.
        losses: The minibatch's mean per-entry SURE at every step (resumed runs included): an
            unbiased estimate of the denoiser's mean squared error per entry at that step.
    """

    network: nn.Module
    losses: list[float]


def train_sure_denoiser(
    network: nn.Module,
    y: Tensor,
    noise_std: float | Tensor,
    config: SUREConfig | None = None,
    *,
    generator: torch.Generator | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    resume: bool = False,
    progress: bool = True,
    callback: Callable[[int, float], None] | None = None,
) -> SUREResult:
    r"""Train a denoiser :math:`F` on noisy images only, by minimising SURE.

    Each step draws a minibatch of :math:`y = x + \sigma n` and descends, with AdamW,

    .. math::
        \mathcal{L} = \frac{1}{B n} \sum_{i=1}^{B} \operatorname{SURE}(F, y_i)
        = \frac{1}{B n} \sum_i \Big(\|y_i - F(y_i)\|^2 + 2 \sigma_i^2
          \widehat{\operatorname{div}}_{y} F(y_i) - n \sigma_i^2\Big),

    whose expectation is the mean squared error per entry :math:`E \|F(y) - x\|^2 / n` (the
    Monte-Carlo divergence of :func:`divergence` is unbiased up to its finite difference), so
    its minimiser over all maps is the posterior mean :math:`E[x \mid y]`, as if trained on
    clean pairs. Unlike :class:`SURELoss`, :math:`F` is a single-level denoiser (no noise
    conditioning): it denoises a batch in one forward pass. Each step costs
    ``1 + config.probes`` forward passes.

    Arguments:
        network: :math:`F`, trained in place: any module mapping ``(B, *shape)`` to
            ``(B, *shape)`` without noise conditioning, e.g. ``UNet(noise_conditioning=False)``.
            Its device is the training device.
        y: The noisy images, shape ``(N, *shape)``, kept on their device (minibatches move).
        noise_std: :math:`\sigma`, a positive float or one value per image, shape ``(N,)``.
        config: The options (the defaults of :class:`SUREConfig` when omitted).
        generator: The source of minibatches and probes (a CPU generator; one is seeded from
            torch's default generator when omitted).
        checkpoint: A file written every ``config.checkpoint_every`` steps and at the end
            (atomically), holding the network, what rebuilds it (``network``: class name and
            ``config``) and what resumes training.
        resume: Continue from ``checkpoint`` if it exists (same data and options expected).
        progress: Show a progress bar with the SURE estimate.
        callback: Called as ``callback(step, loss)`` after every step.

    Returns:
        The trained network and the loss history.

    Raises:
        ValueError: If ``y`` is empty, complex or not finite, ``noise_std`` is not positive or
            does not fit ``y``, the network does not map an image to its shape, or the
            checkpoint was written with other options or another noise level.

    References:
        Metzler, Mousavi, Heckel & Baraniuk (2018). Unsupervised Learning with Stein's Unbiased
        Risk Estimator. https://arxiv.org/abs/1805.10531
    """
    from cleanprior.learning.loop import check_network, make_generator, train_network

    config = config or SUREConfig()
    if y.ndim < 2 or y.shape[0] == 0:
        raise ValueError(f"y must have shape (N, *shape) with N > 0, got {tuple(y.shape)}")
    if not y.is_floating_point():
        raise ValueError(f"y must hold real floating-point values, got {y.dtype}")
    if not torch.isfinite(y).all():
        raise ValueError("the noisy images y contain NaN or infinite values")
    sigma = torch.as_tensor(noise_std, dtype=torch.float64).detach().cpu()
    if sigma.ndim > 1 or (sigma.ndim == 1 and sigma.shape[0] != y.shape[0]):
        raise ValueError(
            f"noise_std must be a float or one value per image ({y.shape[0]},), got shape {tuple(sigma.shape)}"
        )
    if not (torch.isfinite(sigma).all() and (sigma > 0).all()):
        raise ValueError("noise_std must be positive and finite")
    generator = make_generator(generator, "train_sure_denoiser")
    device = check_network(network, y[:1], y[:1].shape, "denoiser")

    def loss(step: int) -> dict[str, Tensor]:
        index = torch.randint(y.shape[0], (config.batch_size,), generator=generator)
        # the probes are drawn on the training device, from a generator seeded by the CPU one,
        # so that a resumed run draws the same probes
        probes = torch.Generator(device=device)
        probes.manual_seed(int(torch.randint(2**62, (), generator=generator)))
        level = sigma[index].to(device) if sigma.ndim else float(sigma)
        risk = sure(
            network,
            y[index].to(device),
            level,
            probes,
            epsilon=config.epsilon,
            probes=config.probes,
            per_entry=True,
        )
        return {"loss": risk.mean()}

    trained, history = train_network(
        network,
        loss,
        config,
        kind="sure",
        generator=generator,
        checkpoint=checkpoint,
        resume=resume,
        progress=progress,
        callback=callback,
        metadata={"noise_std": sigma.tolist()},
    )
    return SUREResult(trained, history["loss"])
