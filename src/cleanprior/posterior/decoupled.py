r"""Decoupled posterior samplers: DAPS and PnP-DM alternate a prior move and a likelihood move.

Neither differentiates through the network: the prior enters only through denoiser calls, the
likelihood :math:`p(y \mid x) = \mathcal{N}(y; A(x), \sigma_y^2 I)` only through :math:`A`, its
adjoint or its vector-Jacobian product. Both are steps of the one sampling loop
(:class:`cleanprior.posterior.steps.PosteriorStep`): DAPS steps down the grid carrying its
Langevin curvature and step index, PnP-DM walks its couplings :math:`\rho_k`, one Gibbs sweep a
step.

- :class:`DAPS` (decoupled annealing). On the decreasing grid :math:`\sigma_0 > \dots > \sigma_N = 0`,
  from :math:`x_{t_i}`: estimate :math:`\hat x_0 = D(x_{t_i}, \sigma_i)` (or run ``ode_steps``
  DDIM steps from :math:`\sigma_i` to 0), take :math:`p(x_0 \mid x_{t_i}) \approx
  \mathcal{N}(\hat x_0, r_i^2 I)` with :math:`r_i = c\, \sigma_i`, sample
  :math:`p(x_0 \mid x_{t_i}, y) \propto p(y \mid x_0)\, \mathcal{N}(x_0; \hat x_0, r_i^2 I)` by
  Langevin dynamics

  .. math:: x_0 \leftarrow x_0 + \eta \left(\nabla \log p(y \mid x_0) - \frac{x_0 - \hat x_0}{r_i^2}\right)
            + \sqrt{2 \eta}\, z,

  with :math:`\nabla \log p(y \mid x_0) = J_A(x_0)^\top (y - A(x_0)) / \sigma_y^2`
  (:math:`A^\top (y - A x_0) / \sigma_y^2` for linear :math:`A`), and re-noise,
  :math:`x_{t_{i+1}} = x_0 + \sigma_{i+1} z`. The last level is 0, so the result is the last
  :math:`x_0`.
- :class:`PnPDM` (split Gibbs). Gibbs sampling of
  :math:`\pi(x, z) \propto p(y \mid z)\, p(x)\, \exp(-\|x - z\|^2 / (2 \rho^2))` with
  :math:`\rho` annealed geometrically from :math:`\rho_{\max}` to :math:`\rho_{\min}`:

  - likelihood step, :math:`z \sim p(y \mid z)\, \mathcal{N}(z; x, \rho^2 I)`: for linear
    :math:`A` a Gaussian of precision :math:`M = A^\top A / \sigma_y^2 + I / \rho^2`, sampled
    exactly by perturb-and-solve,
    :math:`M z = A^\top (y + \sigma_y e_1) / \sigma_y^2 + (x + \rho e_2) / \rho^2`,
    :math:`e_1, e_2 \sim \mathcal{N}(0, I)`, by conjugate gradients. The right-hand side is
    Gaussian with mean :math:`A^\top y / \sigma_y^2 + x / \rho^2 = M \mu` and covariance
    :math:`A^\top A / \sigma_y^2 + I / \rho^2 = M`, so :math:`z = M^{-1} b` has mean :math:`\mu`
    and covariance :math:`M^{-1} M M^{-1} = M^{-1}`: the exact conditional. For a non-linear
    :math:`A`, the Langevin dynamics of DAPS with centre :math:`x` and scale :math:`\rho`.
  - prior step, :math:`x \sim p(x \mid z) \propto p(x)\, \mathcal{N}(z; x, \rho^2 I)`: the
    posterior of a clean signal given its noisy version at level :math:`\rho`, sampled by the
    reverse diffusion (DDPM steps, :math:`\eta = 1`) from :math:`x_t = z` at :math:`\sigma = \rho`
    down to 0.

  The result is the last prior-step sample :math:`x`: its law,
  :math:`p(x)\, \mathcal{N}(y; A x, \sigma_y^2 I + \rho_{\min}^2 A A^\top)` for linear :math:`A`,
  is the posterior with the observation noise widened by :math:`\rho_{\min}`, and it lies on the
  prior's support, where :math:`z` carries fresh likelihood noise.

Langevin steps are set relative to the curvature: :math:`\eta = \mathrm{lr} / (1/r^2 + L)`, where
:math:`L` bounds the curvature of :math:`-\log p(y \mid x)`, :math:`\|J_A\|^2 / \sigma_y^2`
(Gauss-Newton), estimated by power iteration once per call (with :math:`A^\top A` for linear
:math:`A`, finite-difference Jacobian products at the first centre otherwise). An absolute step
(the papers' :math:`10^{-4}` on images) diverges as soon as :math:`1 / r^2` outgrows
:math:`2 / \eta`, i.e. on any grid reaching low levels; the relative step is stable for
:math:`\mathrm{lr} < 2` on every grid. Complex measurements follow the likelihood of
:mod:`cleanprior.posterior.guidance`, :math:`-\|y - A x\|^2 / (2 \sigma_y^2)`.

References:
    Zhang et al. (2025). Improving Diffusion Inverse Problem Solving with Decoupled Noise
    Annealing (DAPS), algorithm 1. https://arxiv.org/abs/2407.01521
    Wu et al. (2024). Principled Probabilistic Imaging using Diffusion Models as Plug-and-Play
    Priors (PnP-DM), algorithm 1. https://arxiv.org/abs/2405.18782
    Papandreou & Yuille (2010). Gaussian Sampling by Local Perturbations (perturb-and-solve).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from cleanprior.diffusion.denoiser import Denoiser
from cleanprior.diffusion.samplers import DDIM, check_grid
from cleanprior.diffusion.schedules import make_grid
from cleanprior.operators.base import Operator, inner
from cleanprior.posterior.linalg import cg
from cleanprior.posterior.steps import Observation, PosteriorStep, per_item

__all__ = ["DAPS", "PnPDM", "daps", "pnpdm"]

_POWER_ITERATIONS = 20


def _positive_int(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _positive_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def _noise_std(noise_std: float | Tensor, y: Tensor) -> Tensor:
    """:math:`\\sigma_y` as shape ``(B,)`` in the real dtype of ``y``, checked positive."""
    std = torch.as_tensor(noise_std, dtype=y.real.dtype, device=y.device)
    if std.ndim > 1 or (std.ndim == 1 and std.shape[0] not in (1, y.shape[0])):
        raise ValueError(f"noise_std must be a float or one value per observation ({y.shape[0]},), got shape {tuple(std.shape)}")
    if not (torch.isfinite(std).all() and (std > 0).all()):
        raise ValueError("noise_std must be positive and finite")
    return std.reshape(-1).expand(y.shape[0])


def _normal(like: Tensor, generator: torch.Generator | None) -> Tensor:
    """Standard normal noise shaped like ``like``; unit variance per real component when complex,
    matching the likelihood :math:`-\\|y - A x\\|^2 / (2 \\sigma_y^2)`."""
    z = torch.randn(like.shape, generator=generator, dtype=like.dtype, device=like.device)
    # torch's complex normals have E|z|^2 = 1, i.e. variance 1/2 per real component.
    return z * math.sqrt(2) if z.is_complex() else z


def _levels(sigmas: Tensor | Sequence[float]) -> list[float]:
    levels = [float(s) for s in torch.as_tensor(sigmas, dtype=torch.float64).flatten()]
    check_grid(levels)
    if levels[-1] != 0:
        raise ValueError(f"the grid must end at 0, got {levels[-1]}")
    if levels[-2] <= 0:
        raise ValueError("the grid needs at least one positive level")
    return levels


class _Likelihood:
    r"""The Gaussian likelihood :math:`p(y \mid x) = \mathcal{N}(y; A(x), \sigma_y^2 I)`.

    Arguments:
        A: The forward model.
        y: Observations, shape ``(B, *y_shape)``.
        noise_std: :math:`\sigma_y`, shape ``(B,)``.
    """

    def __init__(self, A: Operator, y: Tensor, noise_std: Tensor) -> None:
        self.A = A
        self.y = y
        self.noise_std = noise_std

    def score(self, x: Tensor) -> Tensor:
        r""":math:`\nabla_x \log p(y \mid x) = J_A(x)^\top (y - A(x)) / \sigma_y^2`, shape ``(B, *shape)``."""
        residual = self.y - self.A(x)
        v = residual / per_item(self.noise_std, residual) ** 2
        g = self.A.adjoint(v) if self.A.linear else self.A.vjp(x, v)
        return g.real if g.is_complex() and not x.is_complex() else g

    def curvature(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        r"""An estimate of :math:`\|J_A(x)\|^2 / \sigma_y^2`, shape ``(B,)``, by power iteration on
        :math:`J^\top J` (:math:`A^\top A` for linear :math:`A`; finite differences otherwise)."""
        v = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        eigenvalue = torch.zeros(x.shape[0], dtype=x.real.dtype, device=x.device)
        for _ in range(_POWER_ITERATIONS):
            v = v / per_item(inner(v, v).sqrt().clamp_min(torch.finfo(eigenvalue.dtype).tiny), v)
            w = self._gauss_newton(x, v)
            eigenvalue = inner(v, w)
            v = w
        return eigenvalue.clamp_min(0) / self.noise_std**2

    def _gauss_newton(self, x: Tensor, v: Tensor) -> Tensor:
        if self.A.linear:
            g = self.A.gram(v)
        else:
            # A central difference gives J v to O(h^2) without forward-mode support in A.
            h = 1e-3 * (1 + inner(x, x).sqrt() / math.sqrt(x[0].numel()))
            h = per_item(h, x)
            jv = (self.A(x + h * v) - self.A(x - h * v)) / (2 * h.reshape((-1,) + (1,) * (self.y.ndim - 1)))
            g = self.A.vjp(x, jv)
        return g.real if g.is_complex() and not x.is_complex() else g


def _langevin(
    likelihood: _Likelihood,
    center: Tensor,
    scale: float,
    curvature: Tensor,
    *,
    steps: int,
    lr: float,
    generator: torch.Generator | None,
) -> Tensor:
    r"""Langevin dynamics on :math:`p(y \mid x)\, \mathcal{N}(x; c, s^2 I)`, started at :math:`c`.

    .. math:: x \leftarrow x + \eta \left(\nabla \log p(y \mid x) - \frac{x - c}{s^2}\right) + \sqrt{2\eta}\, z,
              \qquad \eta = \frac{\mathrm{lr}}{1 / s^2 + L}

    Arguments:
        likelihood: The likelihood.
        center: :math:`c`, shape ``(B, *shape)``.
        scale: :math:`s > 0`.
        curvature: :math:`L`, shape ``(B,)``.
        steps: The number of Langevin steps.
        lr: The step relative to the curvature bound.
        generator: The source of randomness.

    Returns:
        Shape ``(B, *shape)``.
    """
    eta = per_item(lr / (1 / scale**2 + curvature), center)
    noise_scale = torch.sqrt(2 * eta)
    x = center
    for _ in range(steps):
        drift = likelihood.score(x) - (x - center) / scale**2
        x = x + eta * drift + noise_scale * torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    return x


class _Annealing(NamedTuple):
    r"""The carry of :class:`DAPS`.

    Attributes:
        likelihood: The likelihood of the observation.
        counted: The prior denoiser, counting its calls.
        floor: The grid's smallest positive level.
        last: The index of the last step.
        curvature: The Langevin curvature bound, shape ``(B,)``, set at the first step.
        index: The index of the next step.
    """

    likelihood: _Likelihood
    counted: Denoiser
    floor: float
    last: int
    curvature: Tensor | None
    index: int


class _Coupling(NamedTuple):
    r"""The carry of :class:`PnPDM`.

    Attributes:
        std: :math:`\sigma_y`, shape ``(B,)``.
        curvature: The Langevin curvature bound for a non-linear :math:`A`, shape ``(B,)``.
        floor: The grid's smallest positive level, the prior steps' floor.
    """

    std: Tensor
    curvature: Tensor | None
    floor: float


class _Counted:
    """A denoiser that counts its calls into its owner's ``evaluations``."""

    def __init__(self, denoiser: Denoiser, owner: DAPS | PnPDM) -> None:
        self.denoiser = denoiser
        self.owner = owner

    def __call__(self, x_t: Tensor, sigma: Tensor) -> Tensor:
        self.owner.evaluations += 1
        return self.denoiser(x_t, sigma)


class DAPS(PosteriorStep):
    r"""Decoupled annealing posterior sampling.

    See the module's docstring for the equations. The Langevin step :math:`\eta_i` is annealed
    linearly in the level's index, as in the paper: :math:`\eta_i = \eta (1 - (1 - m)\, i / (N - 1))`
    with :math:`m` = ``lr_min_ratio`` (the paper uses 0.01 on its grid ending at 0.1; on a grid
    reaching 0.002 the default 1, no annealing, keeps the chains mixing at low levels).

    Arguments:
        langevin_steps: Langevin steps per level (100 in the paper).
        lr: The Langevin step relative to the curvature bound, in :math:`(0, 2)`.
        lr_min_ratio: The last level's step as a fraction of the first's, in :math:`(0, 1]`.
        r_scale: :math:`c` in :math:`r_i = c\, \sigma_i` (the paper's :math:`r_i = \sigma_i`).
        ode_steps: 0 for :math:`\hat x_0 = D(x_{t_i}, \sigma_i)`; :math:`k > 0` for :math:`k`
            deterministic DDIM steps from :math:`\sigma_i` to 0 on an EDM grid down to the
            grid's smallest level (the paper's probability-flow estimate).

    Attributes:
        evaluations: Denoiser calls (each on the whole batch) since construction.

    References:
        Zhang et al. (2025). Improving Diffusion Inverse Problem Solving with Decoupled Noise
        Annealing, algorithm 1. https://arxiv.org/abs/2407.01521
    """

    label = "DAPS"

    def __init__(
        self,
        *,
        langevin_steps: int = 100,
        lr: float = 0.5,
        lr_min_ratio: float = 1.0,
        r_scale: float = 1.0,
        ode_steps: int = 0,
    ) -> None:
        self.langevin_steps = _positive_int("langevin_steps", langevin_steps)
        self.lr = _positive_float("lr", lr)
        if not self.lr < 2:
            raise ValueError(f"lr is relative to the curvature and must lie in (0, 2) for a stable Langevin step, got {lr}")
        self.lr_min_ratio = _positive_float("lr_min_ratio", lr_min_ratio)
        if self.lr_min_ratio > 1:
            raise ValueError(f"lr_min_ratio must lie in (0, 1], got {lr_min_ratio}")
        self.r_scale = _positive_float("r_scale", r_scale)
        self.ode_steps = _positive_int("ode_steps", ode_steps, minimum=0)
        self.evaluations = 0

    def init(
        self,
        denoiser: Denoiser,
        observation: Observation,
        x_t: Tensor,
        levels: list[float],
        generator: torch.Generator | None,
    ) -> tuple[Tensor, _Annealing]:
        r"""The carry: the likelihood, the counted denoiser, the grid's floor and last index.

        Raises:
            ValueError: For a grid that does not end at 0 or a bad noise level.
        """
        levels = _levels(levels)
        A, y, noise_std = observation
        likelihood = _Likelihood(A, y, _noise_std(noise_std, y))
        return x_t.detach(), _Annealing(likelihood, _Counted(denoiser, self), levels[-2], len(levels) - 2, None, 0)

    def step(
        self,
        denoiser: Denoiser,
        observation: Observation,
        x_t: Tensor,
        sigma_t: float,
        sigma_s: float,
        carry: _Annealing,
        generator: torch.Generator | None,
    ) -> tuple[Tensor, _Annealing]:
        likelihood, counted, floor, last, curvature, i = carry
        with torch.no_grad():
            if self.ode_steps > 0 and sigma_t > floor:
                # a walk inside this step: its result is checked with the step's
                x0_hat = DDIM(0.0)(counted, x_t, make_grid(self.ode_steps, floor, sigma_t), check_every=0)
            else:
                x0_hat = counted(x_t, torch.full((x_t.shape[0],), sigma_t, dtype=x_t.dtype, device=x_t.device))
        if curvature is None:
            # Two points, because one can sit where J_A vanishes (the kink of |x| at 0).
            curvature = torch.maximum(likelihood.curvature(x0_hat, generator), likelihood.curvature(x_t, generator))
        lr = self.lr * (1 - (1 - self.lr_min_ratio) * (i / last if last > 0 else 1.0))
        x0 = _langevin(likelihood, x0_hat, self.r_scale * sigma_t, curvature, steps=self.langevin_steps,
                       lr=lr, generator=generator)
        x_s = x0 + sigma_s * torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device) if sigma_s > 0 else x0
        return x_s, _Annealing(likelihood, counted, floor, last, curvature, i + 1)

    def __repr__(self) -> str:
        return (f"DAPS(langevin_steps={self.langevin_steps}, lr={self.lr}, lr_min_ratio={self.lr_min_ratio}, "
                f"r_scale={self.r_scale}, ode_steps={self.ode_steps})")


class PnPDM(PosteriorStep):
    r"""Plug-and-play diffusion models: split Gibbs sampling with an annealed coupling :math:`\rho`.

    See the module's docstring for the equations. Outer iteration :math:`k = 0, \dots, K - 1`
    uses :math:`\rho_k = \rho_{\max} (\rho_{\min} / \rho_{\max})^{k / (K - 1)}` (geometric, as
    the paper's decay :math:`\rho_{k+1} = \gamma \rho_k` down to a floor, with :math:`\gamma`
    fixed by the two ends); the chain starts at :math:`x = x_t`.

    Arguments:
        rho_max: The first coupling :math:`\rho_{\max}`; default the grid's first level.
        rho_min: The last coupling :math:`\rho_{\min} \le \rho_{\max}`; default the grid's
            smallest positive level (the posterior is exact as :math:`\rho_{\min} \to 0`; the
            paper stops at 0.1 to 0.3 on images in [-1, 1]).
        iterations_outer: :math:`K`, the Gibbs sweeps; default the grid's number of steps.
        prior_steps: DDPM steps of each prior step, on an EDM grid from :math:`\rho_k` to
            :math:`\min(\sigma_{\min}, \rho_k / 2)` (the grid's smallest level), then 0. The
            ancestral step draws its noise as if :math:`D(x_t)` were the clean signal, so a
            coarse grid under-disperses: for a Gaussian prior of std 0.4 denoised from
            :math:`\rho = 0.7` it keeps 0.69 of the exact variance at 16 steps, 0.91 at 64 and
            0.96 at 128 (the error is :math:`O(1/N)`).
        iterations: Conjugate-gradient iterations of the exact linear likelihood step (exact
            once they reach the number of distinct eigenvalues of :math:`A^\top A`).
        langevin_steps: Langevin steps of the non-linear likelihood step.
        lr: Their step relative to the curvature bound, in :math:`(0, 2)`.

    Attributes:
        evaluations: Denoiser calls (each on the whole batch) since construction.

    References:
        Wu et al. (2024). Principled Probabilistic Imaging using Diffusion Models as Plug-and-Play
        Priors, algorithm 1. https://arxiv.org/abs/2405.18782
        Papandreou & Yuille (2010). Gaussian Sampling by Local Perturbations.
    """

    label = "PnP-DM"

    def __init__(
        self,
        *,
        rho_max: float | None = None,
        rho_min: float | None = None,
        iterations_outer: int | None = None,
        prior_steps: int = 20,
        iterations: int = 20,
        langevin_steps: int = 100,
        lr: float = 0.5,
    ) -> None:
        self.rho_max = None if rho_max is None else _positive_float("rho_max", rho_max)
        self.rho_min = None if rho_min is None else _positive_float("rho_min", rho_min)
        if self.rho_max is not None and self.rho_min is not None and self.rho_min > self.rho_max:
            raise ValueError(f"need rho_min <= rho_max, got rho_min={rho_min}, rho_max={rho_max}")
        self.iterations_outer = None if iterations_outer is None else _positive_int("iterations_outer", iterations_outer)
        self.prior_steps = _positive_int("prior_steps", prior_steps)
        self.iterations = _positive_int("iterations", iterations)
        self.langevin_steps = _positive_int("langevin_steps", langevin_steps)
        self.lr = _positive_float("lr", lr)
        if not self.lr < 2:
            raise ValueError(f"lr is relative to the curvature and must lie in (0, 2) for a stable Langevin step, got {lr}")
        self.evaluations = 0

    def schedule(self, sigmas: Tensor | Sequence[float]) -> list[float]:
        r"""The couplings :math:`\rho_0 \ge \dots \ge \rho_{K-1}` this sampler walks on the grid ``sigmas``.

        Raises:
            ValueError: If the defaults taken from the grid leave :math:`\rho_{\min} > \rho_{\max}`.
        """
        levels = _levels(sigmas)
        rho_max = self.rho_max if self.rho_max is not None else levels[0]
        rho_min = self.rho_min if self.rho_min is not None else min(levels[-2], rho_max)
        if rho_min > rho_max:
            raise ValueError(f"need rho_min <= rho_max, got rho_min={rho_min}, rho_max={rho_max}")
        count = self.iterations_outer if self.iterations_outer is not None else len(levels) - 1
        if count == 1:
            return [rho_min]
        return [rho_max * (rho_min / rho_max) ** (k / (count - 1)) for k in range(count)]

    def likelihood_step(
        self,
        A: Operator,
        y: Tensor,
        noise_std: Tensor,
        x: Tensor,
        rho: float,
        *,
        generator: torch.Generator | None = None,
        curvature: Tensor | None = None,
    ) -> Tensor:
        r"""Draw :math:`z \sim p(y \mid z)\, \mathcal{N}(z; x, \rho^2 I)`.

        Exact for linear :math:`A` (perturb-and-solve with ``iterations`` CG iterations started at
        :math:`x + \rho e_2`); Langevin dynamics otherwise.

        Arguments:
            A: The forward model.
            y: Observations, shape ``(B, *y_shape)``.
            noise_std: :math:`\sigma_y`, shape ``(B,)``.
            x: The current prior sample, shape ``(B, *shape)``.
            rho: The coupling :math:`\rho > 0`.
            generator: The source of randomness.
            curvature: :math:`L` of the Langevin step, shape ``(B,)`` (estimated when None).

        Returns:
            :math:`z`, shape ``(B, *shape)``.
        """
        likelihood = _Likelihood(A, y, noise_std)
        if not A.linear:
            if curvature is None:
                curvature = likelihood.curvature(x, generator)
            return _langevin(likelihood, x, rho, curvature, steps=self.langevin_steps, lr=self.lr, generator=generator)
        precision_y = per_item(1 / noise_std**2, x)
        perturbed_y = y + per_item(noise_std, y) * _normal(y, generator)
        perturbed_x = x + rho * torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        adjoint = A.adjoint(perturbed_y)
        b = precision_y * (adjoint.real if adjoint.is_complex() and not x.is_complex() else adjoint) + perturbed_x / rho**2

        def matvec(v: Tensor) -> Tensor:
            gram = A.gram(v)
            return precision_y * (gram.real if gram.is_complex() and not v.is_complex() else gram) + v / rho**2

        return cg(matvec, b, perturbed_x, iterations=self.iterations).x

    def prior_step(
        self,
        denoiser: Denoiser,
        z: Tensor,
        rho: float,
        *,
        floor: float,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        r"""Draw :math:`x \sim p(x \mid x_\rho = z)` by ``prior_steps`` DDPM steps from level :math:`\rho`.

        Arguments:
            denoiser: The prior denoiser.
            z: The noisy signal at level :math:`\rho`, shape ``(B, *shape)``.
            rho: The level :math:`\rho > 0`.
            floor: The smallest positive level of the sub-grid (taken as ``min(floor, rho / 2)``).
            generator: The source of randomness.

        Returns:
            :math:`x`, shape ``(B, *shape)``; non-finite values are not checked here but by the
            loop that runs the sweep.
        """
        grid = make_grid(self.prior_steps, min(floor, rho / 2), rho)
        with torch.no_grad():
            # a walk inside a sweep: its result is checked with the sweep's
            return DDIM(1.0)(_Counted(denoiser, self), z, grid, generator=generator, check_every=0)

    def walk(self, levels: list[float]) -> list[tuple[float, float]]:
        r"""The sweeps: pairs :math:`(\rho_k, \rho_{k+1})`, the last :math:`(\rho_{K-1}, 0)`.

        Raises:
            ValueError: If the defaults taken from the grid leave :math:`\rho_{\min} > \rho_{\max}`.
        """
        rhos = self.schedule(levels)
        return list(zip(rhos, [*rhos[1:], 0.0]))

    def init(
        self,
        denoiser: Denoiser,
        observation: Observation,
        x_t: Tensor,
        levels: list[float],
        generator: torch.Generator | None,
    ) -> tuple[Tensor, _Coupling]:
        r"""The carry: :math:`\sigma_y` per observation, the Langevin curvature (non-linear
        :math:`A` only) and the grid's smallest positive level, the prior steps' floor."""
        A, y, noise_std = observation
        std = _noise_std(noise_std, y)
        curvature = None if A.linear else _Likelihood(A, y, std).curvature(x_t, generator)
        return x_t.detach(), _Coupling(std, curvature, _levels(levels)[-2])

    def step(
        self,
        denoiser: Denoiser,
        observation: Observation,
        x_t: Tensor,
        sigma_t: float,
        sigma_s: float,
        carry: _Coupling,
        generator: torch.Generator | None,
    ) -> tuple[Tensor, _Coupling]:
        r"""One sweep at :math:`\rho = \sigma_t`: the likelihood step, then the prior step."""
        A, y, _ = observation
        z = self.likelihood_step(A, y, carry.std, x_t, sigma_t, generator=generator, curvature=carry.curvature)
        return self.prior_step(denoiser, z, sigma_t, floor=carry.floor, generator=generator), carry

    def describe(self, sigma_t: float, sigma_s: float) -> str:
        return f"in the likelihood or prior step with rho={sigma_t:.4g}"

    def __repr__(self) -> str:
        return (f"PnPDM(rho_max={self.rho_max}, rho_min={self.rho_min}, iterations_outer={self.iterations_outer}, "
                f"prior_steps={self.prior_steps}, iterations={self.iterations}, langevin_steps={self.langevin_steps}, lr={self.lr})")


def daps(
    denoiser: Denoiser,
    A: Operator | Any,
    y: Tensor,
    noise_std: float | Tensor,
    x_t: Tensor,
    sigmas: Tensor | Sequence[float],
    *,
    generator: torch.Generator | None = None,
    progress: bool = False,
    **options: Any,
) -> Tensor:
    r"""DAPS run by the one sampling loop: ``DAPS(**options)(...)``; options are those of :class:`DAPS`.

    Returns:
        Samples, shape ``(B, *shape)``.
    """
    return DAPS(**options)(denoiser, A, y, noise_std, x_t, sigmas, generator=generator, progress=progress)


def pnpdm(
    denoiser: Denoiser,
    A: Operator | Any,
    y: Tensor,
    noise_std: float | Tensor,
    x_t: Tensor,
    sigmas: Tensor | Sequence[float],
    *,
    generator: torch.Generator | None = None,
    progress: bool = False,
    **options: Any,
) -> Tensor:
    r"""PnP-DM run by the one sampling loop: ``PnPDM(**options)(...)``; options are those of :class:`PnPDM`.

    Returns:
        Samples, shape ``(B, *shape)``.
    """
    return PnPDM(**options)(denoiser, A, y, noise_std, x_t, sigmas, generator=generator, progress=progress)

