r"""Noise2Score: denoising from noisy data alone, by Tweedie's formula for exponential families.

**Tweedie for exponential families.** If the noise law is an exponential family in the
observation, :math:`p(y \mid \eta) = p_0(y) \exp(\eta\, T(y) - \varphi(\eta))`, then for *any*
prior on the natural parameter :math:`\eta` the noisy marginal :math:`p(y)` satisfies

.. math:: E[\eta \mid y]\, T'(y) = l'(y) - l_0'(y), \qquad l = \log p, \quad l_0 = \log p_0,

so the score :math:`l'(y) = \nabla_y \log p(y)` of the *noisy* data, which can be learned from
noisy data only, gives a closed-form estimate :math:`\hat x`. :func:`tweedie` implements the three
models below (per entry; parameters may differ per observation or entry); what each returns is
exact for every prior when handed the exact score:

- ``"gaussian"``, :math:`y = x + \sigma n`: :math:`\eta = x / \sigma^2`, :math:`T(y) = y`,
  :math:`l_0' = -y / \sigma^2`, and
  :math:`\hat x = y + \sigma^2 l'(y) = E[x \mid y]`, the posterior mean.
- ``"poisson"``, :math:`y = \zeta k`, :math:`k \sim \mathcal{P}(x / \zeta)` (the gain
  :math:`\zeta` of :class:`~cleanprior.operators.noise.PoissonNoise`): in the counts,
  :math:`\eta = \log(x / \zeta)`, :math:`T(k) = k`, :math:`p_0(k) = 1 / \Gamma(k + 1)`, so
  :math:`l_0'(k) = -\psi(k + 1)` (digamma). The derivative of the counts' marginal is that of its
  continuation to real :math:`k` through the Gamma function,
  :math:`p(k) = \int \lambda^k e^{-\lambda} g(\lambda)\, d\lambda / \Gamma(k + 1)` (for a Gamma
  prior, the negative binomial pmf written with :math:`\Gamma`), and the score of :math:`y` is
  :math:`l'(y) = l_K'(y / \zeta) / \zeta`. Hence
  :math:`E[\log x \mid y] = \log\zeta + \psi(y/\zeta + 1) + \zeta\, l'(y)` and

  .. math:: \hat x = \zeta\, e^{\psi(y/\zeta + 1)}\, e^{\zeta l'(y)} = \exp E[\log x \mid y]
            \qquad (\texttt{digamma=True}),

  the posterior *geometric* mean. Noise2Score's closed form replaces :math:`\psi(k + 1)` by
  :math:`\log(k + \tfrac12)` (Stirling, with
  :math:`0 < \psi(k + 1) - \log(k + \tfrac12) < 1 / (24 (k + \tfrac12)^2)`), giving the default

  .. math:: \hat x = (y + \zeta / 2)\, e^{\zeta l'(y)},

  which is :math:`\exp E[\log x \mid y]` times a factor in
  :math:`(e^{-1/(24 (k + 1/2)^2)}, 1)`. Neither is the posterior mean
  :math:`E[x \mid y] \geq \exp E[\log x \mid y]` (Jensen): that one needs the ratio
  :math:`E[x \mid y] = \zeta (k + 1)\, p(k + 1) / p(k)` (Robbins' formula), a finite difference
  of the marginal rather than its score.
- ``"gamma"``, :math:`y = x\, G`, :math:`G \sim \Gamma(\alpha, \beta)` (shape :math:`\alpha`,
  rate :math:`\beta`; :class:`~cleanprior.operators.noise.GammaNoise` with shape :math:`k` is
  :math:`\alpha = \beta = k`): :math:`p(y \mid x) = (\beta / x)^\alpha y^{\alpha - 1}
  e^{-\beta y / x} / \Gamma(\alpha)`, so :math:`\eta = -\beta / x`, :math:`T(y) = y`,
  :math:`l_0' = (\alpha - 1) / y`, :math:`E[\beta / x \mid y] = (\alpha - 1)/y - l'(y)` and

  .. math:: \hat x = \frac{\beta\, y}{(\alpha - 1) - y\, l'(y)} = \frac{1}{E[1/x \mid y]},

  the posterior *harmonic* mean (not :math:`E[x \mid y]`, which is larger). An exact score keeps
  the denominator positive; a learned one that does not is inconsistent with the noise model,
  and the estimate is then returned as computed (negative or infinite).

**Learning the score from noisy data** (:func:`ardae_loss`, :func:`train_score`). The amortised
residual denoising autoencoder (AR-DAE) trains a network :math:`R` without noise conditioning by

.. math:: \ell(R) = E_{y, u}\, \tfrac1n \big\| u + \sigma_a R(y + \sigma_a u) \big\|^2,
          \qquad u \sim \mathcal{N}(0, I_n),

whose minimiser is :math:`R^*(\tilde y) = -E[u \mid \tilde y] / \sigma_a
= \nabla \log p_{\sigma_a}(\tilde y)`, the score of the noisy data smoothed by
:math:`\mathcal{N}(0, \sigma_a^2 I)` (Tweedie again, with :math:`u = (\tilde y - y)/\sigma_a`).
It is the denoising autoencoder :math:`F(\tilde y) = \tilde y + \sigma_a^2 R(\tilde y)` with loss
:math:`\|y - F(\tilde y)\|^2 / \sigma_a^2`, so :math:`l'(y) \approx (F(y) - y) / \sigma_a^2 = R(y)`.
The bias vanishes as :math:`\sigma_a \to 0` (for :math:`y \sim \mathcal{N}(\mu, \Sigma)`,
:math:`R^*(\tilde y) = -(\Sigma + \sigma_a^2 I)^{-1}(\tilde y - \mu)`) while the Monte-Carlo
error grows like :math:`1 / \sigma_a` (the regression target :math:`-u / \sigma_a` has variance
:math:`1 / \sigma_a^2`), hence :math:`\sigma_a` is annealed from a large to a small value during
training. The trained network then denoises a batch in one forward pass
(:class:`Noise2Score`), for any of the three noise models.

References:
    Kim & Ye (2021). Noise2Score: Tweedie's Approach to Self-Supervised Image Denoising without
    Clean Images. NeurIPS. https://arxiv.org/abs/2106.07009 (table 1; the reference
    implementation anneals :math:`\sigma_a` linearly).
    Efron (2011). Tweedie's Formula and Selection Bias. JASA 106, 1602-1614.
    Robbins (1956). An Empirical Bayes Approach to Statistics.
    Alain & Bengio (2014). What Regularized Auto-Encoders Learn from the Data-Generating
    Distribution. JMLR 15.
    Lim, Courville, Pal & Huang (2020). AR-DAE: Towards Unbiased Neural Entropy Gradient
    Estimation. ICML. https://arxiv.org/abs/2006.05164
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from cleanprior.operators.noise import Noise

__all__ = [
    "NOISE_PARAMETERS",
    "Noise2Score",
    "ScoreConfig",
    "ScoreResult",
    "ardae_loss",
    "train_score",
    "tweedie",
]

NOISE_PARAMETERS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "gaussian": (("std",), ()),
    "poisson": (("gain",), ()),
    "gamma": (("shape",), ("rate",)),
}
"""The noise models of :func:`tweedie`: their required and optional parameters."""


def _resolve_noise(
    noise: str | Noise, params: dict[str, Any], digamma: bool
) -> tuple[str, dict[str, float | Tensor]]:
    """The model's name and its validated parameters (a :class:`Noise` object brings its own).

    Raises:
        ValueError: For an unknown model, a missing, unexpected or non-positive parameter.
        TypeError: For a parameter that is neither a number nor a tensor.
    """
    if isinstance(noise, Noise):
        if params:
            raise ValueError(
                f"parameters {sorted(params)} given with a noise model that has its own"
            )
        params = {k: v for k, v in noise.parameters_dict().items() if k != "name"}
        noise = noise.name
    if noise not in NOISE_PARAMETERS:
        raise ValueError(
            f"noise must be one of {sorted(NOISE_PARAMETERS)} (exponential families), got {noise!r}"
        )
    required, optional = NOISE_PARAMETERS[noise]
    missing = [k for k in required if k not in params]
    unexpected = [k for k in params if k not in required + optional]
    if missing or unexpected:
        raise ValueError(
            f"{noise} noise takes the parameters {list(required)} (required) and {list(optional)} "
            f"(optional); missing {missing}, unexpected {unexpected}"
        )
    if digamma and noise != "poisson":
        raise ValueError(
            f"digamma=True is the exact Poisson normaliser; {noise} noise has no such option"
        )
    resolved: dict[str, float | Tensor] = {}
    for key, value in params.items():
        if isinstance(value, Tensor):
            if value.is_complex() or not (torch.isfinite(value).all() and (value > 0).all()):
                raise ValueError(
                    f"the {noise} noise parameter '{key}' must be real, positive and finite"
                )
            resolved[key] = value
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            if not (0 < float(value) < float("inf")):
                raise ValueError(
                    f"the {noise} noise parameter '{key}' must be positive and finite, got {value}"
                )
            resolved[key] = float(value)
        else:
            raise TypeError(
                f"the {noise} noise parameter '{key}' must be a float or a tensor, got {type(value).__name__}"
            )
    return noise, resolved


def _aligned(key: str, value: float | Tensor, y: Tensor) -> Tensor:
    """A parameter lined up with ``y`` from the left (batch first), in its dtype and device."""
    if not isinstance(value, Tensor) or value.ndim == 0:
        return torch.as_tensor(value, dtype=y.dtype, device=y.device)
    shape = (*value.shape, *(1,) * (y.ndim - value.ndim))
    try:
        fits = value.ndim <= y.ndim and torch.broadcast_shapes(shape, y.shape) == y.shape
    except RuntimeError:
        fits = False
    if not fits:
        raise ValueError(
            f"the noise parameter '{key}' of shape {tuple(value.shape)} does not fit observations of "
            f"shape {tuple(y.shape)}: give it shape (B, ...) lining up with them from the left"
        )
    return value.reshape(shape).to(dtype=y.dtype, device=y.device)


def tweedie(
    y: Tensor,
    score: Tensor,
    noise: str | Noise = "gaussian",
    *,
    digamma: bool = False,
    **params: float | Tensor,
) -> Tensor:
    r"""The Noise2Score estimate :math:`\hat x` from the score of the noisy data.

    .. math::
        \text{gaussian: } \hat x = y + \sigma^2 l'(y), \qquad
        \text{poisson: } \hat x = (y + \zeta/2)\, e^{\zeta l'(y)}
        \;\big(\zeta\, e^{\psi(y/\zeta + 1) + \zeta l'(y)} \text{ with } \texttt{digamma}\big),
        \qquad
        \text{gamma: } \hat x = \frac{\beta y}{(\alpha - 1) - y\, l'(y)}.

    With the exact score these are, for every prior, :math:`E[x \mid y]` (Gaussian),
    :math:`\exp E[\log x \mid y]` (Poisson with ``digamma``; the default is its Stirling
    approximation) and :math:`1 / E[1/x \mid y]` (Gamma); see the module's documentation.

    Arguments:
        y: Noisy observations, shape ``(B, *shape)``; non-negative for Poisson noise (``y /
            gain`` are the counts), positive for Gamma noise.
        score: :math:`l'(y) = \nabla_y \log p(y)`, the score of the noisy data, shape of ``y``.
        noise: ``"gaussian"``, ``"poisson"`` or ``"gamma"``, or a
            :class:`~cleanprior.operators.noise.Noise` of one of these kinds (then its own
            parameters are used and ``params`` must be empty).
        digamma: Poisson only: use the exact :math:`\psi(k + 1)` instead of Noise2Score's
            :math:`\log(k + 1/2)`.
        params: ``std`` :math:`\sigma` (gaussian); ``gain`` :math:`\zeta` (poisson); ``shape``
            :math:`\alpha` and optionally ``rate`` :math:`\beta`, default :math:`\alpha` (gamma,
            :math:`E[G] = \alpha / \beta`). Each a positive float or a tensor lining up with
            ``y`` from the left (``(B,)`` is one value per observation).

    Returns:
        :math:`\hat x`, shape ``(B, *shape)``.

    Raises:
        ValueError: For an unknown noise model, missing, unexpected or non-positive parameters,
            mismatched shapes, non-finite inputs, or observations outside the model's support.
        TypeError: For a parameter that is neither a number nor a tensor.
    """
    name, values = _resolve_noise(noise, params, digamma)
    if y.ndim < 1 or score.shape != y.shape:
        raise ValueError(
            f"score must have the shape of y (B, *shape); got y {tuple(y.shape)} and score {tuple(score.shape)}"
        )
    if not (torch.isfinite(y).all() and torch.isfinite(score).all()):
        raise ValueError("y and score must be finite")
    aligned = {key: _aligned(key, value, y) for key, value in values.items()}
    if name == "gaussian":
        return y + aligned["std"] ** 2 * score
    if name == "poisson":
        if (y < 0).any():
            raise ValueError(
                "poisson noise: the observations y = gain * counts must be non-negative"
            )
        gain = aligned["gain"]
        if digamma:
            return gain * torch.exp(torch.digamma(y / gain + 1) + gain * score)
        return (y + gain / 2) * torch.exp(gain * score)
    if (y <= 0).any():
        raise ValueError("gamma noise: the observations must be positive (the law's support)")
    alpha = aligned["shape"]
    beta = aligned.get("rate", alpha)
    return beta * y / ((alpha - 1) - y * score)


def ardae_loss(
    network: Callable[[Tensor], Tensor], y: Tensor, sigma_a: float, noise: Tensor
) -> Tensor:
    r"""The AR-DAE score-matching loss, one value per sample.

    .. math:: \ell_i = \tfrac1n \big\| u_i + \sigma_a R(y_i + \sigma_a u_i) \big\|^2

    (a mean over the :math:`n` entries of a sample). Its minimiser is the score of the data
    smoothed by :math:`\mathcal{N}(0, \sigma_a^2 I)`; the minimum is
    :math:`1 - \sigma_a^2 E\|\nabla \log p_{\sigma_a}\|^2 / n`, e.g. :math:`s^2 / (s^2 + \sigma_a^2)`
    for :math:`y \sim \mathcal{N}(\mu, s^2 I)`.

    Arguments:
        network: The score network :math:`R`, shape ``(B, *shape)`` to ``(B, *shape)``.
        y: Noisy data, shape ``(B, *shape)``.
        sigma_a: The perturbation :math:`\sigma_a > 0`.
        noise: :math:`u`, standard normal, shape ``(B, *shape)``.

    Returns:
        The per-sample loss, shape ``(B,)``.
    """
    if not sigma_a > 0:
        raise ValueError(f"sigma_a must be positive, got {sigma_a}")
    if noise.shape != y.shape:
        raise ValueError(
            f"noise must have the shape of y {tuple(y.shape)}, got {tuple(noise.shape)}"
        )
    residual = noise + sigma_a * network(y + sigma_a * noise)
    return residual.pow(2).flatten(1).mean(1)


@dataclasses.dataclass
class ScoreConfig:
    r"""Options of AR-DAE score training.

    :math:`\sigma_a` decays linearly from ``sigma_start`` to ``sigma_end`` over the first
    ``anneal`` fraction of the steps, then stays at ``sigma_end`` (the reference
    implementation's schedule). The defaults suit data in [-1, 1] (the reference's
    0.05 to 0.001 on [0, 1] data, doubled).

    Attributes:
        steps: Optimiser steps.
        batch_size: Samples per step (drawn with replacement).
        lr: AdamW's learning rate.
        weight_decay: AdamW's decoupled weight decay.
        clip: Maximum gradient norm (``0`` disables clipping).
        sigma_start: :math:`\sigma_a` at the first step.
        sigma_end: :math:`\sigma_a` at the end of the annealing (at most ``sigma_start``).
        anneal: The fraction of the steps, in (0, 1], over which :math:`\sigma_a` decays.
        checkpoint_every: Steps between checkpoints (when a checkpoint path is given).
    """

    steps: int = 10_000
    batch_size: int = 64
    lr: float = 2e-4
    weight_decay: float = 0.0
    clip: float = 1.0
    sigma_start: float = 0.1
    sigma_end: float = 0.002
    anneal: float = 1.0
    checkpoint_every: int = 1000

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "checkpoint_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ScoreConfig.{name} must be a positive integer, got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"ScoreConfig.lr must be positive, got {self.lr}")
        if self.weight_decay < 0 or self.clip < 0:
            raise ValueError("ScoreConfig.weight_decay and ScoreConfig.clip must be non-negative")
        if not 0 < self.sigma_end <= self.sigma_start < float("inf"):
            raise ValueError(
                f"ScoreConfig needs 0 < sigma_end <= sigma_start, got sigma_start={self.sigma_start}, "
                f"sigma_end={self.sigma_end}"
            )
        if not 0 < self.anneal <= 1:
            raise ValueError(f"ScoreConfig.anneal must lie in (0, 1], got {self.anneal}")

    def sigma_a(self, step: int) -> float:
        r""":math:`\sigma_a` at ``step`` (0-based)."""
        progress = min(1.0, step / max(1.0, self.anneal * (self.steps - 1)))
        return self.sigma_start + progress * (self.sigma_end - self.sigma_start)


@dataclasses.dataclass
class ScoreResult:
    r"""What :func:`train_score` returns.

    Attributes:
        network: The trained score network :math:`R \approx l'`, in eval mode.
        losses: The mean AR-DAE loss of every step (resumed runs included).
        sigmas: :math:`\sigma_a` of every step.
    """

    network: nn.Module
    losses: list[float]
    sigmas: list[float]


def train_score(
    network: nn.Module,
    y: Tensor,
    config: ScoreConfig | None = None,
    *,
    generator: torch.Generator | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    resume: bool = False,
    progress: bool = True,
    callback: Callable[[int, float], None] | None = None,
) -> ScoreResult:
    r"""Learn the score :math:`l'(y)` of noisy data by AR-DAE with an annealed :math:`\sigma_a`.

    Arguments:
        network: The score network :math:`R`, trained in place: any module mapping
            ``(B, *shape)`` to ``(B, *shape)`` without noise conditioning, e.g.
            ``UNet(noise_conditioning=False)``. Its device is the training device.
        y: The noisy data, shape ``(N, *shape)``, kept on its device; minibatches are moved.
        config: The options (the defaults of :class:`ScoreConfig` when omitted).
        generator: The source of minibatches and perturbations (a CPU generator; one is seeded
            from torch's default generator when omitted).
        checkpoint: A file written every ``config.checkpoint_every`` steps and at the end
            (atomically), holding the network and what resumes training.
        resume: Continue from ``checkpoint`` if it exists (same data and options expected).
        progress: Show a progress bar with the loss and :math:`\sigma_a`.
        callback: Called as ``callback(step, loss)`` after every step.

    Returns:
        The network, the loss history and the :math:`\sigma_a` of every step.

    Raises:
        ValueError: If ``y`` is empty or not finite, the network does not map a sample to its
            shape, or the checkpoint was written with other options.
    """
    from cleanprior.learning.loop import check_network, make_generator, train_network

    config = config or ScoreConfig()
    if y.ndim < 2 or y.shape[0] == 0:
        raise ValueError(f"y must have shape (N, *shape) with N > 0, got {tuple(y.shape)}")
    if not torch.isfinite(y).all():
        raise ValueError("the noisy data y contain NaN or infinite values")
    generator = make_generator(generator, "train_score")
    device = check_network(network, y[:1], y[:1].shape, "score network")

    def loss(step: int) -> dict[str, Tensor]:
        index = torch.randint(y.shape[0], (config.batch_size,), generator=generator)
        u = torch.randn((config.batch_size, *y.shape[1:]), generator=generator, dtype=y.dtype)
        sigma_a = config.sigma_a(step)
        return {"loss": ardae_loss(network, y[index].to(device), sigma_a, u.to(device)).mean()}

    trained, history = train_network(
        network,
        loss,
        config,
        kind="noise2score",
        generator=generator,
        checkpoint=checkpoint,
        resume=resume,
        progress=progress,
        callback=callback,
        postfix=lambda step: {"sigma_a": f"{config.sigma_a(step):.3g}"},
    )
    losses = history["loss"]
    return ScoreResult(trained, losses, [config.sigma_a(step) for step in range(len(losses))])


class Noise2Score(nn.Module):
    r"""A denoiser from a learned score: :math:`\hat x = \operatorname{tweedie}(y, R(y))`.

    One forward pass of the score network per batch. Score training never uses the noise
    model, so one trained network serves whichever formula matches the data's noise: the model
    and its parameters are chosen here, at denoising time.

    Arguments:
        network: The score network :math:`R \approx l'` (e.g. from :func:`train_score`).
        noise: ``"gaussian"``, ``"poisson"``, ``"gamma"`` or a
            :class:`~cleanprior.operators.noise.Noise` of these kinds.
        digamma: Poisson only: the exact :math:`\psi(k + 1)` instead of :math:`\log(k + 1/2)`.
        params: The noise parameters (see :func:`tweedie`).

    Raises:
        ValueError: For an unknown noise model or missing, unexpected or non-positive
            parameters.
    """

    def __init__(
        self,
        network: nn.Module,
        noise: str | Noise = "gaussian",
        *,
        digamma: bool = False,
        **params: float | Tensor,
    ) -> None:
        super().__init__()
        self.noise, self.params = _resolve_noise(noise, params, digamma)
        self.network = network
        self.digamma = bool(digamma)

    def score(self, y: Tensor) -> Tensor:
        r"""The learned score :math:`R(y) \approx \nabla_y \log p(y)`, shape of ``y``."""
        return self.network(y)

    def forward(self, y: Tensor) -> Tensor:
        r"""Denoise a batch.

        Arguments:
            y: Noisy observations, shape ``(B, *shape)``.

        Returns:
            :math:`\hat x`, shape ``(B, *shape)``.
        """
        return tweedie(y, self.score(y), self.noise, digamma=self.digamma, **self.params)
