r"""Guidance rules: posterior denoisers built from a prior denoiser, an operator and an observation.

Given a prior denoiser :math:`D(x_t) \approx E[x \mid x_t]`, an observation :math:`y = A(x) + n`
with :math:`n \sim \mathcal{N}(0, \sigma_y^2 I)`, Tweedie's formula applied to the posterior gives

.. math:: D(x_t \mid y) = D(x_t) + \lambda\, \sigma_t^2 \nabla_{x_t} \log p(y \mid x_t),

where :math:`\lambda` is EMDiffusion's likelihood weight (1 is Bayes' rule). Each rule here is one
estimate of :math:`\nabla_{x_t} \log p(y \mid x_t)`. A posterior denoiser is again a denoiser, so every
sampler of :mod:`cleanprior.diffusion.samplers` draws posterior samples with it, unchanged.

With :math:`d = D(x_t)`, :math:`J = \partial d / \partial x_t` and :math:`r = y - A d`:

- :class:`DPS`: :math:`p(y \mid x_t) \approx p(y \mid d)`. With a step size :math:`\zeta`, the
  paper's normalised step :math:`\sigma_t^2 g = -\zeta \nabla_{x_t} \|r\|`; without, the Gaussian
  score :math:`g = J^\top A^\top r / \sigma_y^2`. Works for non-linear :math:`A`.
- :class:`MMPS`: moment matching, :math:`p(x \mid x_t) \approx \mathcal{N}(d, \sigma_t^2 J)`, so
  :math:`g = J^\top A^\top u` with :math:`(\sigma_y^2 I + \sigma_t^2 A J A^\top) u = r` solved by a
  few Krylov iterations whose products :math:`J v` are vector-Jacobian products (:math:`J` is
  symmetric for an exact denoiser).
- :class:`PiGDM` and :class:`SDA`: the same with the heuristic covariances :math:`\sigma_t^2 I` and
  :math:`\sigma_t^2 / (1 + \sigma_t^2) I`.
- :class:`TMPD`: the same with the row sums :math:`\operatorname{diag}(\sigma_t^2 J \mathbf{1})`.

References:
    Chung et al. (2023). Diffusion Posterior Sampling for General Noisy Inverse Problems.
    https://arxiv.org/abs/2209.14687
    Rozet et al. (2024). Learning Diffusion Priors from Observations by Expectation Maximization
    (DiEM), section 4.2 and algorithm 3. https://arxiv.org/abs/2405.13712
    Song et al. (2023). Pseudoinverse-Guided Diffusion Models for Inverse Problems (PiGDM).
    Rozet & Louppe (2023). Score-based Data Assimilation (SDA).
    Boys et al. (2023). Tweedie Moment Projected Diffusions for Inverse Problems (TMPD).
    Bai et al. (2024). An Expectation-Maximization Algorithm for Training Clean Diffusion Models
    from Corrupted Observations (EMDiffusion): the likelihood weight.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from cleanprior.diffusion.denoiser import Denoiser, batch_sigma, expand_sigma
from cleanprior.operators.base import Operator, as_operator

__all__ = ["PosteriorDenoiser", "DPS", "MMPS", "PiGDM", "SDA", "TMPD", "GUIDANCE", "posterior_denoiser"]


def _per_item(value: Tensor, like: Tensor) -> Tensor:
    """Broadcast a per-observation scalar ``(B,)`` or a scalar to multiply ``like``."""
    return value.reshape((-1,) + (1,) * (like.ndim - 1)) if value.ndim > 0 else value


class PosteriorDenoiser(nn.Module):
    r"""A denoiser of :math:`p(x \mid y)`: :math:`D(x_t) + \lambda \sigma_t^2 \nabla \log p(y \mid x_t)`.

    Subclasses implement :meth:`likelihood_score`. The counters ``evaluations`` and ``vjps``
    record the denoiser calls and vector-Jacobian products spent, for cost reports.

    Arguments:
        denoiser: The prior denoiser.
        operator: The forward model :math:`A` (an operator or any differentiable callable).
        y: Observations, shape ``(B, *y_shape)``.
        noise_std: :math:`\sigma_y`, a float or shape ``(B,)``; positive.
        weight: The likelihood weight :math:`\lambda \geq 0`.
    """

    linear_only = True

    def __init__(
        self,
        denoiser: Denoiser,
        operator: Operator | Any,
        y: Tensor,
        noise_std: float | Tensor,
        *,
        weight: float = 1.0,
    ) -> None:
        super().__init__()
        self.denoiser = denoiser
        self.A = as_operator(operator)
        if self.linear_only and not self.A.linear:
            raise TypeError(
                f"{type(self).__name__} needs a linear operator with an adjoint; use method='dps' "
                "for a non-linear forward model, or declare a linear callable with as_operator(f, linear=True)"
            )
        if not torch.isfinite(torch.view_as_real(y) if y.is_complex() else y).all():
            raise ValueError("the observation y contains NaN or infinite values")
        noise_std = torch.as_tensor(noise_std, dtype=y.real.dtype, device=y.device)
        if noise_std.ndim > 1 or (noise_std.ndim == 1 and noise_std.shape[0] not in (1, y.shape[0])):
            raise ValueError(f"noise_std must be a float or one value per observation ({y.shape[0]},), got shape {tuple(noise_std.shape)}")
        if not (torch.isfinite(noise_std).all() and (noise_std > 0).all()):
            raise ValueError("noise_std must be positive and finite")
        if not weight >= 0:
            raise ValueError(f"the likelihood weight must be non-negative, got {weight}")
        self.register_buffer("y", y)
        self.register_buffer("noise_std", noise_std)
        self.weight = float(weight)
        self.evaluations = 0
        self.vjps = 0

    def likelihood_score(self, x_t: Tensor, d: Tensor, sigma: Tensor) -> Tensor:
        r"""Estimate :math:`\nabla_{x_t} \log p(y \mid x_t)`.

        Arguments:
            x_t: Noisy samples with ``requires_grad``, shape ``(B, *shape)``.
            d: :math:`D(x_t)`, computed from ``x_t`` in the autograd graph, shape ``(B, *shape)``.
            sigma: Levels, shape ``(B,)``.

        Returns:
            The score estimate, shape ``(B, *shape)``.
        """
        raise NotImplementedError

    def vjp(self, x_t: Tensor, d: Tensor, v: Tensor) -> Tensor:
        r""":math:`J^\top v`, through the graph of ``d = D(x_t)`` (kept for further products)."""
        self.vjps += 1
        (grad,) = torch.autograd.grad(d, x_t, v, retain_graph=True)
        return grad

    def forward(self, x_t: Tensor, sigma: Tensor | float) -> Tensor:
        r"""The posterior denoiser :math:`D(x_t \mid y)`.

        Arguments:
            x_t: Noisy samples, shape ``(B, *shape)``, one per observation.
            sigma: Levels, broadcastable to ``(B,)``.

        Returns:
            Shape ``(B, *shape)``, detached.
        """
        if x_t.shape[0] != self.y.shape[0]:
            raise ValueError(f"{x_t.shape[0]} samples for {self.y.shape[0]} observations: give one x_t per observation")
        sigma = batch_sigma(sigma, x_t)
        self.evaluations += 1
        with torch.enable_grad():
            x = x_t.detach().requires_grad_(True)
            d = self.denoiser(x, sigma)
            g = self.likelihood_score(x, d, sigma) if self.weight > 0 else torch.zeros_like(d)
        return (d + self.weight * expand_sigma(sigma, x_t) ** 2 * g).detach()


class DPS(PosteriorDenoiser):
    r"""Diffusion posterior sampling: the likelihood evaluated at the denoised estimate.

    With a step size :math:`\zeta` (the paper's rule), the posterior mean moves by
    :math:`\sigma_t^2 g = -\zeta \nabla_{x_t} \|y - A(D(x_t))\|` (per observation), a step of
    length at most :math:`\zeta \|J^\top\|` that does not blow up when :math:`\sigma_y` is small.
    With ``zeta=None`` (the default), the Gaussian likelihood of the denoised estimate, widened by
    the estimate's own error, of order :math:`\sigma_t`:
    :math:`g = \nabla_{x_t} \log \mathcal{N}(y; A(D(x_t)), (\sigma_y^2 + c\,\sigma_t^2) I)`
    (the twist of Wu et al.'s TDS; :math:`c = 0` is the bare likelihood, whose step
    :math:`\sigma_t^2 / \sigma_y^2` overshoots and diverges when :math:`\sigma_y` is small against
    the prior's spread).

    The normalised step keeps its length as :math:`\sigma_t \to 0`, so it overshoots by up to
    :math:`\zeta` at the last steps; the Gaussian form shrinks with the residual.

    Arguments:
        zeta: The step size, or None for the Gaussian likelihood.
        widen: :math:`c \geq 0`, the widening of the Gaussian likelihood.
        kwargs: Those of :class:`PosteriorDenoiser`.

    References:
        Chung et al. (2023), algorithm 1.
    """

    linear_only = False

    def __init__(self, *args: Any, zeta: float | None = None, widen: float = 1.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not widen >= 0:
            raise ValueError(f"widen must be non-negative, got {widen}")
        self.widen = float(widen)
        if zeta is not None and not zeta > 0:
            raise ValueError(f"zeta must be positive, got {zeta}")
        self.zeta = zeta

    def likelihood_score(self, x_t: Tensor, d: Tensor, sigma: Tensor) -> Tensor:
        r = self.y - self.A(d)
        squared = torch.real(torch.conj(r) * r).reshape(r.shape[0], -1).sum(1)
        if self.zeta is None:
            log_p = -0.5 * squared / (self.noise_std.expand_as(squared) ** 2 + self.widen * sigma**2)
        else:
            log_p = -self.zeta * torch.sqrt(squared + torch.finfo(squared.dtype).tiny)
            log_p = log_p / sigma**2
        self.vjps += 1
        (grad,) = torch.autograd.grad(log_p.sum(), x_t)
        return grad


class _Gaussian(PosteriorDenoiser):
    r"""The moment-matching family: :math:`g = J^\top A^\top u`, :math:`(\sigma_y^2 I + A V A^\top) u = r`.

    Subclasses define the covariance product ``cov(x_t, d, sigma, v)`` :math:`= V v`.

    Arguments:
        solver: ``"cg"``, ``"gmres"`` or ``"bicgstab"``.
        iterations: Krylov iterations (1 to 5 suffice in practice; DiEM uses 1 to 3).
        kwargs: Those of :class:`PosteriorDenoiser`.

    Attributes:
        breakdowns: Solves that broke down, per observation and step, summed on the device (a
            tensor once a solve ran) so that a step never waits to count them.
    """

    def __init__(self, *args: Any, solver: str = "cg", iterations: int = 3, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        from cleanprior.posterior.linalg import SOLVERS

        if solver not in SOLVERS:
            raise ValueError(f"unknown solver {solver!r}; known solvers: {sorted(SOLVERS)}")
        if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
            raise ValueError(f"iterations must be a positive integer, got {iterations!r}")
        self.solver = solver
        self.iterations = iterations
        self.breakdowns: int | Tensor = 0

    def cov(self, x_t: Tensor, d: Tensor, sigma: Tensor, v: Tensor) -> Tensor:
        raise NotImplementedError

    def likelihood_score(self, x_t: Tensor, d: Tensor, sigma: Tensor) -> Tensor:
        from cleanprior.posterior.linalg import solve

        A = self.A
        d_detached = d.detach()
        r = self.y - A(d_detached)
        noise_var = _per_item(self.noise_std**2, r)

        def matvec(v: Tensor) -> Tensor:
            return noise_var * v + A(self.cov(x_t, d, sigma, A.adjoint(v)))

        result = solve(self.solver, matvec, r, iterations=self.iterations)
        self.breakdowns = self.breakdowns + result.breakdown.sum()
        return self.vjp(x_t, d, A.adjoint(result.x).to(d.dtype))


class MMPS(_Gaussian):
    r"""Moment matching posterior sampling: :math:`V = \sigma_t^2 J`, :math:`J v` by a VJP.

    References:
        Rozet et al. (2024), DiEM, eq. (12) and algorithm 3.
    """

    def cov(self, x_t: Tensor, d: Tensor, sigma: Tensor, v: Tensor) -> Tensor:
        return expand_sigma(sigma, v) ** 2 * self.vjp(x_t, d, v.to(d.dtype))


class PiGDM(_Gaussian):
    r"""Pseudo-inverse guidance: the heuristic covariance :math:`V = \sigma_t^2 I`.

    References:
        Song et al. (2023), PiGDM, with :math:`r_t^2 = \sigma_t^2` in the VE parameterization.
    """

    def cov(self, x_t: Tensor, d: Tensor, sigma: Tensor, v: Tensor) -> Tensor:
        return expand_sigma(sigma, v) ** 2 * v


class SDA(_Gaussian):
    r"""Score-based data assimilation's covariance :math:`V = \sigma_t^2 / (1 + \sigma_t^2) I`.

    Meant for standardised data (unit variance), where it interpolates between :math:`\sigma_t^2`
    at low noise and the prior's variance 1 at high noise.

    References:
        Rozet & Louppe (2023), SDA, section 3.
    """

    def cov(self, x_t: Tensor, d: Tensor, sigma: Tensor, v: Tensor) -> Tensor:
        s2 = expand_sigma(sigma, v) ** 2
        return s2 / (1 + s2) * v


class TMPD(_Gaussian):
    r"""Tweedie moment projection: the row sums :math:`V = \operatorname{diag}(\sigma_t^2 J \mathbf{1})`.

    One extra VJP per denoiser call (:math:`J \mathbf{1}`, with :math:`J` symmetric), cached for
    the solver's iterations; negative row sums are clipped at 0 to keep :math:`V` a covariance.

    References:
        Boys et al. (2023), TMPD, section 3.
    """

    def likelihood_score(self, x_t: Tensor, d: Tensor, sigma: Tensor) -> Tensor:
        self._rows = (expand_sigma(sigma, d) ** 2 * self.vjp(x_t, d, torch.ones_like(d))).clamp_min(0)
        return super().likelihood_score(x_t, d, sigma)

    def cov(self, x_t: Tensor, d: Tensor, sigma: Tensor, v: Tensor) -> Tensor:
        return self._rows.to(v.dtype) * v


GUIDANCE: dict[str, type[PosteriorDenoiser]] = {
    "dps": DPS,
    "mmps": MMPS,
    "pigdm": PiGDM,
    "sda": SDA,
    "tmpd": TMPD,
}


def posterior_denoiser(
    denoiser: Denoiser,
    forward: Operator | Any,
    y: Tensor,
    *,
    noise_std: float | Tensor,
    method: str = "mmps",
    weight: float = 1.0,
    **options: Any,
) -> PosteriorDenoiser:
    r"""The guided denoiser :math:`D(x_t \mid y)` of a rule, for users who run their own loop.

    Arguments:
        denoiser: The prior denoiser.
        forward: The forward model (an operator or a differentiable callable).
        y: Observations, shape ``(B, *y_shape)``.
        noise_std: :math:`\sigma_y`, a float or shape ``(B,)``.
        method: ``"dps"``, ``"mmps"``, ``"pigdm"``, ``"sda"`` or ``"tmpd"``.
        weight: The likelihood weight :math:`\lambda`.
        options: The rule's options (``zeta`` for DPS; ``solver`` and ``iterations`` for the
            moment-matching family).

    Raises:
        ValueError: For an unknown method.
        TypeError: For an option the rule does not take.
    """
    if method not in GUIDANCE:
        raise ValueError(f"unknown guidance rule {method!r}; known rules: {sorted(GUIDANCE)}")
    return GUIDANCE[method](denoiser, forward, y, noise_std, weight=weight, **options)
