r"""DiffPIR, data consistency, ILVR and MCG: posterior methods as steps of the one sampling loop.

Each alternates an unconditional reverse-diffusion step with a step toward the observation
:math:`y = A x + n`, :math:`n \sim \mathcal{N}(0, \sigma_y^2 I)`, on a decreasing grid
:math:`\sigma_0 > \dots > \sigma_N = 0`. With :math:`d = D(x_t, \sigma_t)` and the DDIM / DDPM step
of :mod:`cleanprior.diffusion.samplers`,
:math:`x_s = d + \sqrt{\sigma_s^2 - \tau^2}\,(x_t - d)/\sigma_t + \tau z`,
:math:`\tau = \eta\, \sigma_s \sqrt{1 - \sigma_s^2/\sigma_t^2}`:

- :func:`diffpir`: replace :math:`d` by the proximal point
  :math:`\hat x_0 = \arg\min_x \|y - A x\|^2 + \rho_t \|x - d\|^2`,
  :math:`\rho_t = \lambda \sigma_y^2 / \sigma_t^2`, then re-noise
  :math:`x_s = \hat x_0 + \sigma_s (\sqrt{1 - \zeta}\, \hat\epsilon + \sqrt{\zeta}\, z)`,
  :math:`\hat\epsilon = (x_t - \hat x_0)/\sigma_t`.
- :func:`data_consistency` (``"dc"``, score-MRI / POCS): after each step,
  :math:`x_s \leftarrow x_s + \gamma A^\top (y - A x_s)` or
  :math:`x_s \leftarrow x_s - A^+(A x_s - y)`.
- :func:`ilvr`: :math:`x_s \leftarrow x_s - \Phi x_s + \Phi y_s`, :math:`\Phi = A^+ A`,
  :math:`y_s = A^+ y + \sigma_s z`.
- :func:`mcg`: a DPS step, then the projection :math:`x_s \leftarrow x_s - A^+(A x_s - y_s)` with
  :math:`y_s = y + \sigma_s A z` the observation diffused to :math:`\sigma_s`.

ILVR's low-frequency replacement and MCG's projection are the same map: since
:math:`A^+ A A^+ = A^+`, :math:`\Phi(A^+ y + \sigma_s z) = A^+(y + \sigma_s A z)`, so both are
:math:`x_s - A^+(A x_s - y_s)`; MCG adds the DPS gradient before it.

Each is a :class:`cleanprior.posterior.steps.PosteriorStep` (:class:`DiffPIR`,
:class:`DataConsistency`, :class:`ILVR`, :class:`MCG`) run by the loop of
:class:`cleanprior.diffusion.samplers.Sampler`; the functions of the same names call them with the
arguments ``(denoiser, A, y, noise_std, x_t, sigmas, *, generator, progress, **options)``.

References:
    Zhu et al. (2023). Denoising Diffusion Models for Plug-and-Play Image Restoration (DiffPIR),
    algorithm 1. https://arxiv.org/abs/2305.08995
    Chung & Ye (2022). Score-based diffusion models for accelerated MRI. Medical Image Analysis 80
    (the data-consistency step after each reverse step).
    Choi et al. (2021). ILVR: Conditioning Method for Denoising Diffusion Probabilistic Models,
    eq. (5). https://arxiv.org/abs/2108.02938
    Chung et al. (2022). Improving Diffusion Models for Inverse Problems using Manifold
    Constraints (MCG), eq. (14) and algorithm 1. https://arxiv.org/abs/2206.00941
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from cleanprior.diffusion.denoiser import Denoiser, batch_sigma
from cleanprior.diffusion.samplers import ddim_step
from cleanprior.operators.base import Operator, inner
from cleanprior.posterior.guidance import posterior_denoiser
from cleanprior.posterior.linalg import solve
from cleanprior.posterior.steps import Observation, PosteriorStep, per_item

__all__ = ["ILVR", "MCG", "DataConsistency", "DiffPIR", "data_consistency", "diffpir", "ilvr", "mcg"]

_MODES = ("gradient", "projection")


def _check_linear(method: str, A: Operator, *, pinv: bool) -> None:
    """Refuse, before sampling, an operator without the adjoint or pseudo-inverse needed."""
    if not A.linear:
        raise ValueError(
            f"{method} needs a linear operator with an adjoint; use method='dps' for a non-linear "
            "forward model"
        )
    if pinv and not getattr(A, "has_pinv", False):
        raise ValueError(
            f"{method} projects onto {{A x = y}} and needs an operator with an exact "
            f"pseudo-inverse (has_pinv); {A._label()} has none: use method='mmps', 'diffpir' or "
            "dc with mode='gradient'"
        )


def _check_eta(eta: float) -> None:
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must lie in [0, 1], got {eta}")


def _diffused(
    A: Operator, y: Tensor, sigma: float, like: Tensor, generator: torch.Generator | None
) -> Tensor:
    r"""The observation diffused to :math:`\sigma`: :math:`y + \sigma A z`, the shape of ``y``.

    ``like`` (shape ``(B, *shape)``) gives the shape, dtype and device of :math:`z`.
    """
    if sigma == 0:
        return y
    z = torch.randn(like.shape, generator=generator, dtype=like.dtype, device=like.device)
    return y + sigma * A(z)


def _project(A: Operator, x: Tensor, y: Tensor) -> Tensor:
    r"""The projection onto :math:`\{A x = y\}`: :math:`x - A^+(A x - y)`, shape of ``x``."""
    return x - A.pinv(A(x) - y).to(x.dtype)


def _gram_norm(
    A: Operator, like: Tensor, generator: torch.Generator | None, iterations: int = 30
) -> Tensor:
    r""":math:`\|A^\top A\|_2` per observation by power iteration, shape ``(B,)``.

    The start is random (drawn from ``generator``) so that it is not orthogonal to the leading
    eigenvector by construction, as a constant start would be for difference operators.
    """
    v = torch.randn(like.shape, generator=generator, dtype=like.dtype, device=like.device)
    norm = inner(v, v).sqrt()
    for _ in range(iterations):
        v = v / per_item(norm.clamp_min(torch.finfo(norm.dtype).tiny), v)
        v = A.gram(v).to(like.dtype)
        norm = inner(v, v).sqrt()
    return norm



class DiffPIR(PosteriorStep):
    r"""DiffPIR: a proximal data step on the denoised estimate, then a partial re-noising.

    From :math:`x_t` at level :math:`\sigma_t`, with :math:`d = D(x_t, \sigma_t)`:

    .. math::
        \hat x_0 = \arg\min_x \|y - A x\|^2 + \rho_t \|x - d\|^2
                 = (A^\top A + \rho_t I)^{-1} (A^\top y + \rho_t d), \qquad
        \rho_t = \lambda \sigma_y^2 / \sigma_t^2,

    then :math:`x_s = \hat x_0 + \sigma_s (\sqrt{1 - \zeta}\, \hat\epsilon + \sqrt{\zeta}\, z)`
    with :math:`\hat\epsilon = (x_t - \hat x_0)/\sigma_t`, and :math:`x_0 = \hat x_0` at the last
    step. The proximal point is the posterior mean given :math:`y` under the Gaussian
    :math:`p(x \mid x_t) \approx \mathcal{N}(d, \sigma_t^2/\lambda\, I)`: the objective is
    :math:`\|y - Ax\|^2/(2\sigma_y^2) + \lambda \|x - d\|^2/(2 \sigma_t^2)`, the paper's
    :math:`\rho_t` multiplying the unscaled data term, so :math:`\lambda = 1` is Bayes' rule for
    that Gaussian (the paper tunes :math:`\lambda` and :math:`\zeta` per task). It is solved by
    conjugate gradients on :meth:`gram`, warm-started at :math:`d`, for any linear :math:`A`.

    The re-noising is the DDIM step of the samplers with :math:`d` replaced by :math:`\hat x_0` and
    :math:`\tau = \sqrt{\zeta}\, \sigma_s`: :math:`\zeta` plays the role of ``eta``, which DiffPIR
    does not take. The carry is :math:`A^\top y`, shape ``(B, *shape)``, and
    :math:`\sigma_y^2` shaped to multiply it.

    Arguments:
        lam: :math:`\lambda > 0`, the weight of the prior in the proximal step.
        zeta: :math:`\zeta \in [0, 1]`, the share of fresh noise in the re-noising.
        iterations: Conjugate-gradient iterations per step; CG is exact after as many
            iterations as :math:`A^\top A` has distinct eigenvalues (2 for a binary mask).

    References:
        Zhu et al. (2023), DiffPIR, algorithm 1 and eq. (13).
    """

    label = "diffpir"

    def __init__(self, *, lam: float = 1.0, zeta: float = 0.3, iterations: int = 5) -> None:
        if not (math.isfinite(lam) and lam > 0):
            raise ValueError(f"lam must be positive and finite, got {lam}")
        if not 0.0 <= zeta <= 1.0:
            raise ValueError(f"zeta must lie in [0, 1], got {zeta}")
        if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
            raise ValueError(f"iterations must be a positive integer, got {iterations!r}")
        self.lam, self.zeta, self.iterations = float(lam), float(zeta), iterations

    def check(self, A: Operator) -> None:
        _check_linear("diffpir", A, pinv=False)

    @torch.no_grad()
    def init(
        self,
        denoiser: Denoiser,
        observation: Observation,
        x_t: Tensor,
        levels: list[float],
        generator: torch.Generator | None,
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        A, y, noise_std = observation
        adjoint_y = A.adjoint(y).to(x_t.dtype)
        noise_var = per_item(torch.as_tensor(noise_std, dtype=x_t.dtype, device=x_t.device) ** 2, x_t)
        return x_t, (adjoint_y, noise_var)

    @torch.no_grad()
    def step(
        self,
        denoiser: Denoiser,
        observation: Observation,
        x_t: Tensor,
        sigma_t: float,
        sigma_s: float,
        carry: tuple[Tensor, Tensor],
        generator: torch.Generator | None,
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        A = observation.A
        adjoint_y, noise_var = carry
        d = denoiser(x_t, batch_sigma(sigma_t, x_t))
        rho = self.lam * noise_var / sigma_t**2

        def matvec(v: Tensor) -> Tensor:
            return A.gram(v).to(v.dtype) + rho * v

        x0_hat = solve("cg", matvec, adjoint_y + rho * d, d, iterations=self.iterations).x
        if sigma_s == 0:
            return x0_hat, carry
        eps_hat = (x_t - x0_hat) / sigma_t
        z = torch.randn(x_t.shape, generator=generator, dtype=x_t.dtype, device=x_t.device)
        return x0_hat + sigma_s * (math.sqrt(1 - self.zeta) * eps_hat + math.sqrt(self.zeta) * z), carry


class DataConsistency(PosteriorStep):
    r"""Unconditional reverse steps, each followed by a data-consistency step (score-MRI, POCS).

    After each DDIM / DDPM step to :math:`x_s`, either

    .. math::
        x_s \leftarrow x_s + \gamma A^\top (y - A x_s) \quad (\text{gradient}), \qquad
        x_s \leftarrow x_s - A^+ (A x_s - y) \quad (\text{projection}).

    Following the score-MRI recipe (Ye's talk, MATH.md section 2), the step acts on the noisy
    iterate :math:`x_s` itself, against the raw observation :math:`y` (not diffused to the level),
    the last one on the final sample. The projection is noiseless POCS: the samples end exactly on
    :math:`\{A x = y\}` and ``noise_std`` is not used, so for noisy :math:`y` they inherit its
    noise in the range of :math:`A^\top` (use ``"mmps"`` or :class:`DiffPIR` to weigh it). A
    gradient step with :math:`\gamma = 1/\|A^\top A\|` is the projection for operators with
    orthonormal rows (masks). The carry is :math:`\gamma` shaped to multiply :math:`x_s` (None
    for the projection).

    Arguments:
        mode: ``"gradient"`` or ``"projection"``.
        step: :math:`\gamma > 0` of the gradient step; by default :math:`1/\|A^\top A\|_2` per
            observation, estimated by 30 power iterations on :meth:`gram` before sampling (1 for
            a binary mask), the largest step that never overshoots.
        eta: Stochasticity of the DDIM step (1 is ancestral DDPM sampling, as in score-MRI).

    References:
        Chung & Ye (2022), score-MRI, eq. (9)-(10); Choi et al. (2021) and Chung et al. (2022,
        CCDF) for the projection.
    """

    label = "dc"

    def __init__(self, *, mode: str = "gradient", step: float | None = None, eta: float = 1.0) -> None:
        if mode not in _MODES:
            known = ", ".join(_MODES)
            raise ValueError(f"unknown data-consistency mode {mode!r}; known modes: {known}")
        if step is not None and not (math.isfinite(step) and step > 0):
            raise ValueError(f"step must be positive and finite, got {step}")
        _check_eta(eta)
        # ``step`` names the option as users know it; the attribute may not shadow the method
        self.mode, self.gamma, self.eta = mode, step, float(eta)

    def check(self, A: Operator) -> None:
        _check_linear(f"dc (mode={self.mode!r})", A, pinv=self.mode == "projection")

    @torch.no_grad()
    def init(
        self,
        denoiser: Denoiser,
        observation: Observation,
        x_t: Tensor,
        levels: list[float],
        generator: torch.Generator | None,
    ) -> tuple[Tensor, Tensor | None]:
        if self.mode == "projection":
            return x_t, None
        if self.gamma is not None:
            return x_t, torch.tensor(self.gamma, dtype=x_t.dtype, device=x_t.device)
        norm = _gram_norm(observation.A, x_t, generator)
        return x_t, per_item(torch.where(norm > 0, 1 / norm, torch.zeros_like(norm)), x_t)

    @torch.no_grad()
    def step(
        self,
        denoiser: Denoiser,
        observation: Observation,
        x_t: Tensor,
        sigma_t: float,
        sigma_s: float,
        carry: Tensor | None,
        generator: torch.Generator | None,
    ) -> tuple[Tensor, Tensor | None]:
        A, y, _ = observation
        x_s = ddim_step(denoiser, x_t, sigma_t, sigma_s, self.eta, generator)
        if carry is None:
            return _project(A, x_s, y), carry
        return x_s + carry * A.adjoint(y - A(x_s)).to(x_s.dtype), carry


class ILVR(PosteriorStep):
    r"""Iterative latent variable refinement: replace the low frequencies after each step.

    After each DDIM / DDPM step to :math:`x_s`,

    .. math::
        x_s \leftarrow x_s - \Phi x_s + \Phi y_s, \qquad \Phi = A^+ A, \qquad
        y_s = A^+ y + \sigma_s z,

    with :math:`z \sim \mathcal{N}(0, I)`: the part of :math:`x_s` that :math:`A` sees is that of
    the observation diffused to the current level. For average downsampling :math:`\Phi` is
    ILVR's low-pass filter (downsample, then upsample); for a mask it keeps the observed pixels.
    Computed as :math:`x_s - A^+(A x_s - y - \sigma_s A z)`, the same map. The filter acts at
    every level (ILVR's full conditioning range) and ``noise_std`` is not used: at
    :math:`\sigma_s = 0` the samples satisfy :math:`\Phi x = A^+ y`. Nothing is carried.

    Arguments:
        eta: Stochasticity of the DDIM step (1 is ancestral DDPM sampling, as in ILVR).

    References:
        Choi et al. (2021), ILVR, eq. (5) and algorithm 1.
    """

    label = "ilvr"

    def __init__(self, *, eta: float = 1.0) -> None:
        _check_eta(eta)
        self.eta = float(eta)

    def check(self, A: Operator) -> None:
        _check_linear("ilvr", A, pinv=True)

    @torch.no_grad()
    def step(
        self,
        denoiser: Denoiser,
        observation: Observation,
        x_t: Tensor,
        sigma_t: float,
        sigma_s: float,
        carry: None,
        generator: torch.Generator | None,
    ) -> tuple[Tensor, None]:
        A, y, _ = observation
        x_s = ddim_step(denoiser, x_t, sigma_t, sigma_s, self.eta, generator)
        return _project(A, x_s, _diffused(A, y, sigma_s, x_s, generator)), carry


class MCG(PosteriorStep):
    r"""Manifold-constrained gradient: a DPS step followed by a projection onto the measurements.

    Each step is the DDIM / DDPM step of the DPS posterior denoiser
    :math:`D(x_t) + \lambda \sigma_t^2 \nabla_{x_t} \log p(y \mid D(x_t))` (see
    :class:`cleanprior.posterior.guidance.DPS`: the Gaussian likelihood, or the normalised step
    :math:`-\zeta \nabla_{x_t} \|y - A D(x_t)\|`), then

    .. math::
        x_s \leftarrow x_s - A^+ (A x_s - y_s), \qquad y_s = y + \sigma_s A z,

    the projection onto the measurement set of the observation diffused to :math:`\sigma_s`
    (MCG's :math:`A x_s = y_s`). At :math:`\sigma_s = 0` it projects onto :math:`\{A x = y\}`, so
    the samples fit the observation exactly, noise included (the projection ignores
    :math:`\sigma_y`, which only scales the Gaussian DPS step). The carry is the DPS denoiser,
    built from the prior's at the start (the gradient runs through the prior denoiser).

    Arguments:
        zeta: DPS's normalised step size, or None for the Gaussian likelihood.
        weight: The likelihood weight :math:`\lambda \geq 0` of the DPS step.
        eta: Stochasticity of the DDIM step (1 is ancestral sampling, as in MCG).

    References:
        Chung et al. (2022), MCG, eq. (14) and algorithm 1; Chung et al. (2023), DPS.
    """

    label = "mcg"

    def __init__(self, *, zeta: float | None = None, weight: float = 1.0, eta: float = 1.0) -> None:
        _check_eta(eta)
        self.zeta, self.weight, self.eta = zeta, float(weight), float(eta)

    def check(self, A: Operator) -> None:
        _check_linear("mcg", A, pinv=True)

    def init(
        self,
        denoiser: Denoiser,
        observation: Observation,
        x_t: Tensor,
        levels: list[float],
        generator: torch.Generator | None,
    ) -> tuple[Tensor, Denoiser]:
        A, y, noise_std = observation
        guided = posterior_denoiser(
            denoiser, A, y, noise_std=noise_std, method="dps", weight=self.weight, zeta=self.zeta
        )
        return x_t, guided

    def step(
        self,
        denoiser: Denoiser,
        observation: Observation,
        x_t: Tensor,
        sigma_t: float,
        sigma_s: float,
        carry: Denoiser,
        generator: torch.Generator | None,
    ) -> tuple[Tensor, Denoiser]:
        A, y, _ = observation
        x_s = ddim_step(carry, x_t, sigma_t, sigma_s, self.eta, generator)
        with torch.no_grad():
            return _project(A, x_s, _diffused(A, y, sigma_s, x_s, generator)), carry


def diffpir(
    denoiser: Denoiser,
    A: Operator,
    y: Tensor,
    noise_std: float | Tensor,
    x_t: Tensor,
    sigmas: Tensor | Sequence[float],
    *,
    generator: torch.Generator | None = None,
    progress: bool = False,
    lam: float = 1.0,
    zeta: float = 0.3,
    iterations: int = 5,
) -> Tensor:
    r"""DiffPIR (:class:`DiffPIR`) run by the one sampling loop.

    Arguments:
        denoiser: The prior denoiser.
        A: A linear operator.
        y: Observations, shape ``(B, *y_shape)``.
        noise_std: :math:`\sigma_y`, a float or shape ``(B,)``.
        x_t: Samples at ``sigmas[0]``, shape ``(B, *shape)``.
        sigmas: Decreasing levels ending at 0, shape ``(N + 1,)``.
        generator: The source of randomness.
        progress: Show a progress bar.
        lam, zeta, iterations: The options of :class:`DiffPIR`.

    Returns:
        Samples, shape ``(B, *shape)``.

    Raises:
        ValueError: For a bad option or a non-linear operator (before sampling).
        NonFiniteError: If a step produces NaN or infinite values.
    """
    method = DiffPIR(lam=lam, zeta=zeta, iterations=iterations)
    return method(denoiser, A, y, noise_std, x_t, sigmas, generator=generator, progress=progress)


def data_consistency(
    denoiser: Denoiser,
    A: Operator,
    y: Tensor,
    noise_std: float | Tensor,
    x_t: Tensor,
    sigmas: Tensor | Sequence[float],
    *,
    generator: torch.Generator | None = None,
    progress: bool = False,
    mode: str = "gradient",
    step: float | None = None,
    eta: float = 1.0,
) -> Tensor:
    r"""Data consistency (:class:`DataConsistency`) run by the one sampling loop.

    Arguments:
        denoiser: The prior denoiser.
        A: A linear operator (with ``has_pinv`` for the projection).
        y: Observations, shape ``(B, *y_shape)``.
        noise_std: :math:`\sigma_y` (unused: both steps are noiseless).
        x_t: Samples at ``sigmas[0]``, shape ``(B, *shape)``.
        sigmas: Decreasing levels ending at 0, shape ``(N + 1,)``.
        generator: The source of randomness.
        progress: Show a progress bar.
        mode, step, eta: The options of :class:`DataConsistency`.

    Returns:
        Samples, shape ``(B, *shape)``.

    Raises:
        ValueError: For an unknown mode, a bad step or ``eta``, or an operator without the
            pseudo-inverse the projection needs (before sampling).
        NonFiniteError: If a step produces NaN or infinite values.
    """
    method = DataConsistency(mode=mode, step=step, eta=eta)
    return method(denoiser, A, y, noise_std, x_t, sigmas, generator=generator, progress=progress)


def ilvr(
    denoiser: Denoiser,
    A: Operator,
    y: Tensor,
    noise_std: float | Tensor,
    x_t: Tensor,
    sigmas: Tensor | Sequence[float],
    *,
    generator: torch.Generator | None = None,
    progress: bool = False,
    eta: float = 1.0,
) -> Tensor:
    r"""ILVR (:class:`ILVR`) run by the one sampling loop.

    Arguments:
        denoiser: The prior denoiser.
        A: A linear operator with ``has_pinv``.
        y: Observations, shape ``(B, *y_shape)``.
        noise_std: :math:`\sigma_y` (unused).
        x_t: Samples at ``sigmas[0]``, shape ``(B, *shape)``.
        sigmas: Decreasing levels ending at 0, shape ``(N + 1,)``.
        generator: The source of randomness.
        progress: Show a progress bar.
        eta: Stochasticity of the DDIM step.

    Returns:
        Samples, shape ``(B, *shape)``.

    Raises:
        ValueError: For a bad ``eta`` or an operator without a pseudo-inverse (before sampling).
        NonFiniteError: If a step produces NaN or infinite values.
    """
    return ILVR(eta=eta)(denoiser, A, y, noise_std, x_t, sigmas, generator=generator, progress=progress)


def mcg(
    denoiser: Denoiser,
    A: Operator,
    y: Tensor,
    noise_std: float | Tensor,
    x_t: Tensor,
    sigmas: Tensor | Sequence[float],
    *,
    generator: torch.Generator | None = None,
    progress: bool = False,
    zeta: float | None = None,
    weight: float = 1.0,
    eta: float = 1.0,
) -> Tensor:
    r"""MCG (:class:`MCG`) run by the one sampling loop.

    Arguments:
        denoiser: The prior denoiser (differentiable: the gradient runs through it).
        A: A linear operator with ``has_pinv``.
        y: Observations, shape ``(B, *y_shape)``.
        noise_std: :math:`\sigma_y`, a float or shape ``(B,)``.
        x_t: Samples at ``sigmas[0]``, shape ``(B, *shape)``.
        sigmas: Decreasing levels ending at 0, shape ``(N + 1,)``.
        generator: The source of randomness.
        progress: Show a progress bar.
        zeta, weight, eta: The options of :class:`MCG`.

    Returns:
        Samples, shape ``(B, *shape)``.

    Raises:
        ValueError: For a bad option or an operator without a pseudo-inverse (before sampling).
        NonFiniteError: If a step produces NaN or infinite values.
    """
    method = MCG(zeta=zeta, weight=weight, eta=eta)
    return method(denoiser, A, y, noise_std, x_t, sigmas, generator=generator, progress=progress)
