r"""Calibration diagnostics of posterior samples: the posterior predictive check and credible-interval coverage.

:func:`posterior_predictive` needs no ground truth, so an EM run can record it every round: for
observations :math:`y = A x + n`, :math:`n \sim \mathcal{N}(0, \sigma_y^2 I_m)`, and one posterior
sample :math:`x` per observation, it is the residual's energy per measurement in units of the
noise variance,

.. math:: \chi^2(y, x) = \frac{\|y - A x\|^2}{m\, \sigma_y^2}.

If :math:`x` is an exact sample of :math:`p(x \mid y)` and :math:`y` comes from the model, the pair
:math:`(x, y)` has the model's joint law, so :math:`y - A x` has the law of the noise and
:math:`E\,\chi^2 = 1` exactly, whatever the prior. For one :math:`y` and a Gaussian prior
:math:`\mathcal{N}(\mu_0, \Sigma_0)`, with :math:`A \Sigma_0 A^\top = \sum_i \lambda_i v_i v_i^\top`
and :math:`c_i = v_i^\top (y - A \mu_0)`, the posterior's mean :math:`\mu'` and covariance
:math:`\Sigma'` give

.. math::
    E\big[\|y - A x\|^2 \mid y\big] = \|y - A \mu'\|^2 + \operatorname{tr}(A \Sigma' A^\top)
    = \sum_i \frac{\sigma_y^4\, c_i^2}{(\sigma_y^2 + \lambda_i)^2}
      + \frac{\sigma_y^2 \lambda_i}{\sigma_y^2 + \lambda_i},

whose mean over :math:`y` (:math:`E c_i^2 = \lambda_i + \sigma_y^2`) is :math:`m \sigma_y^2`, term by
term. Read it as:

- near 1: the samples explain the data to within the noise, as the true posterior does;
- far above 1: the prior cannot explain the observations (a prior sample ignoring :math:`y`
  scores :math:`1 + 2 \operatorname{tr}(A \Sigma_0 A^\top) / (m \sigma_y^2)` on average);
- far below 1: the samples fit the noise (overfitting; a least-squares solution of an
  under-determined system scores 0).

:func:`coverage` needs the truth: the fraction of pixels whose true value lies in the central
credible interval of the samples. For a truth exchangeable with exact posterior samples, it is the
nominal level on average.

References:
    Gelman, Meng & Stern (1996). Posterior Predictive Assessment of Model Fitness via Realized
    Discrepancies. Statistica Sinica 6.
    Hyndman & Fan (1996). Sample Quantiles in Statistical Packages. The American Statistician 50(4).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from cleanprior.operators.base import Operator, as_operator

__all__ = ["posterior_predictive", "coverage"]


def _finite(name: str, value: Tensor) -> None:
    if not torch.isfinite(torch.view_as_real(value) if value.is_complex() else value).all():
        raise ValueError(f"{name} contains NaN or infinite values")


def _noise_levels(noise_std: float | Tensor, y: Tensor) -> Tensor:
    """``noise_std`` lined up with ``y`` from the left, as a real tensor broadcasting to it."""
    sigma = torch.as_tensor(noise_std, device=y.device)
    if sigma.is_complex() or sigma.dtype == torch.bool:
        raise ValueError(f"noise_std must hold real numbers, got {sigma.dtype}")
    sigma = sigma.to(y.real.dtype)
    if sigma.ndim > y.ndim:
        raise ValueError(f"noise_std of shape {tuple(sigma.shape)} has more dimensions than y {tuple(y.shape)}")
    sigma = sigma.reshape(sigma.shape + (1,) * (y.ndim - sigma.ndim)) if sigma.ndim > 0 else sigma
    try:
        fits = torch.broadcast_shapes(sigma.shape, y.shape) == y.shape
    except RuntimeError:
        fits = False
    if not fits:
        raise ValueError(
            f"noise_std of shape {tuple(sigma.shape)} does not line up with y of shape {tuple(y.shape)}: "
            "give a float, one level per observation (B,), or levels (1 or B, ...) per entry"
        )
    if not (torch.isfinite(sigma).all() and (sigma > 0).all()):
        raise ValueError("noise_std must be positive and finite")
    return sigma


def posterior_predictive(
    y: Tensor,
    A: Operator | Any,
    x: Tensor,
    noise_std: float | Tensor,
) -> Tensor:
    r"""The posterior predictive check :math:`\|y - A x\|^2 / (m \sigma_y^2)` of every observation.

    :math:`m` is the number of entries of one observation: every entry is taken to carry noise,
    as :func:`cleanprior.corrupt` draws it (a masked pixel holds pure noise, not a zero). For
    complex measurements (k-space) the library's noise is circular with
    :math:`E |n_i|^2 = \sigma_y^2`, i.e. two real dimensions of variance :math:`\sigma_y^2 / 2` each,
    so dividing :math:`\sum_i |r_i|^2` by :math:`m \sigma_y^2` with :math:`m` complex entries is the
    same as by :math:`2m` real dimensions times their variance: the check is 1 on average for
    real and complex data alike. Levels per entry weigh each residual by its own
    :math:`\sigma_i^2`: :math:`\frac1m \sum_i |r_i|^2 / \sigma_i^2`.

    Arguments:
        y: Observations, shape ``(B, *y_shape)``, real or complex.
        A: The forward model: an operator or a callable, batch first.
        x: One posterior sample per observation, shape ``(B, *x_shape)`` (for several samples,
            repeat ``y`` along the batch and average).
        noise_std: :math:`\sigma_y > 0`: a float, shape ``(B,)``, or shape ``(1 or B, ...)`` lined up
            with ``y`` from the left (per channel or per entry).

    Returns:
        Shape ``(B,)``, real: near 1 when calibrated, above when the samples cannot explain the
        data, below when they fit its noise.

    Raises:
        ValueError: For mismatched batches, non-finite inputs, non-positive noise levels or a
            model output whose shape is not that of ``y``.
    """
    if not isinstance(y, Tensor) or not isinstance(x, Tensor):
        raise TypeError("y and x must be tensors")
    if y.ndim < 2 or x.ndim < 2:
        raise ValueError(f"y and x must be batches (B, ...), got shapes {tuple(y.shape)} and {tuple(x.shape)}")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x holds {x.shape[0]} samples for {y.shape[0]} observations: give one per observation")
    _finite("y", y)
    _finite("x", x)
    sigma = _noise_levels(noise_std, y)
    prediction = as_operator(A)(x)
    if prediction.shape != y.shape:
        raise ValueError(f"A(x) has shape {tuple(prediction.shape)} but y has shape {tuple(y.shape)}")
    residual = y - prediction
    energy = (torch.real(torch.conj(residual) * residual) / sigma**2).reshape(y.shape[0], -1).sum(1)
    return energy / y[0].numel()


def coverage(
    samples: Tensor,
    truth: Tensor,
    levels: Sequence[float] = (0.5, 0.9),
) -> dict[float, Tensor]:
    r"""The fraction of pixels whose true value lies in the samples' central credible interval.

    For a level :math:`\ell`, the interval of every pixel runs between the sample quantiles of
    orders :math:`(1 \mp \ell) / 2`, the quantile of order :math:`p` being the order statistic
    :math:`x_{(p (S + 1))}` of the :math:`S` samples, linearly interpolated between neighbours
    (Hyndman & Fan's definition 6). As :math:`E\,F(x_{(k)}) = k / (S + 1)` for :math:`S` draws of a
    continuous law :math:`F`, a truth drawn from the same law as the samples falls inside with
    probability exactly :math:`\ell` when :math:`p (S + 1)` is an integer (e.g. :math:`S = 39` or
    :math:`99` for 50% and 90%), and within interpolation error otherwise. So exact posterior
    samples score the nominal level on average; overconfident ones (too narrow) score below it,
    underconfident ones above.

    Arguments:
        samples: :math:`S` posterior samples per observation, shape ``(B, S, *shape)``, real.
        truth: The true signals, shape ``(B, *shape)``.
        levels: Credible levels in (0, 1).

    Returns:
        ``{level: fraction}``, each fraction of shape ``(B,)`` (per observation; average it over
        the batch for a run's figure).

    Raises:
        ValueError: For mismatched shapes, non-finite or complex inputs, a level outside (0, 1),
            or too few samples for a level: the outermost quantile needs :math:`p (S + 1) \geq 1`,
            i.e. :math:`S \geq (1 + \ell) / (1 - \ell)` (19 samples for 90%).
    """
    if not isinstance(samples, Tensor) or not isinstance(truth, Tensor):
        raise TypeError("samples and truth must be tensors")
    if samples.ndim < 3:
        raise ValueError(f"samples must have shape (B, S, *shape), got {tuple(samples.shape)}")
    if truth.shape != samples.shape[:1] + samples.shape[2:]:
        expected = tuple(samples.shape[:1] + samples.shape[2:])
        raise ValueError(f"truth must have shape (B, *shape) = {expected}, got {tuple(truth.shape)}")
    for name, value in (("samples", samples), ("truth", truth)):
        if value.is_complex() or not value.is_floating_point():
            raise ValueError(f"{name} must be real floating-point, got {value.dtype}")
        _finite(name, value)
    levels = tuple(levels)
    if not levels:
        raise ValueError("levels must hold at least one level")
    S = samples.shape[1]
    for level in levels:
        if not (isinstance(level, (int, float)) and 0 < level < 1):
            raise ValueError(f"levels must lie in (0, 1), got {level!r}")
        needed = math.ceil((1 + level) / (1 - level) - 1e-9)
        if S < needed:
            raise ValueError(
                f"the {level:g} credible interval needs at least {needed} samples per observation, got {S}"
            )

    ordered = samples.sort(dim=1).values
    truth = truth.to(ordered.dtype)[:, None]

    def quantile(p: float) -> Tensor:
        position = p * (S + 1) - 1  # 0-based rank of the order statistic
        below = min(max(math.floor(position), 0), S - 1)
        above = min(below + 1, S - 1)
        weight = position - below
        return torch.lerp(ordered[:, below : below + 1], ordered[:, above : above + 1], weight)

    fractions = {}
    for level in levels:
        inside = (quantile((1 - level) / 2) <= truth) & (truth <= quantile((1 + level) / 2))
        fractions[float(level)] = inside.reshape(samples.shape[0], -1).to(ordered.dtype).mean(1)
    return fractions
