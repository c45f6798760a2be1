r"""``sample_posterior``: one posterior sample per observation, by any method, from any denoiser.

Every method walks the noise grid through the one loop of
:class:`cleanprior.diffusion.samplers.Sampler`, in one of two ways, both listed in
:data:`METHOD_TABLE`: a guidance rule (:mod:`cleanprior.posterior.guidance`) is a posterior
denoiser run by any sampler (``"pc"`` is the moment-matching denoiser under the
predictor-corrector sampler, DiEM's low-dimensional experiment); any other method is a
:class:`cleanprior.posterior.steps.PosteriorStep`, a sampler step with a carried state.

Every method can start late (CCDF, "come closer, diffuse faster"): with ``start=x0_hat`` (or
``start="pinv"`` for :math:`A^+ y`) and ``sigma_start``, the chain begins at
:math:`x_{t_0} = \hat x_0 + \sigma_{t_0} z` and runs only the part of the grid below
:math:`\sigma_{t_0}`.

References:
    Chung et al. (2022). Come-Closer-Diffuse-Faster: Accelerating Conditional Diffusion Models
    for Inverse Problems through Stochastic Contraction. https://arxiv.org/abs/2112.05146
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from cleanprior.devices import device_generator
from cleanprior.diffusion.denoiser import Denoiser
from cleanprior.diffusion.samplers import SAMPLER_OPTIONS, compiled, get_sampler, noisy_start
from cleanprior.diffusion.schedules import SIGMA_MAX, SIGMA_MIN, make_grid
from cleanprior.operators.base import Operator, as_operator
from cleanprior.posterior.decoupled import DAPS, PnPDM
from cleanprior.posterior.guidance import (
    DPS,
    MMPS,
    SDA,
    TMPD,
    PiGDM,
    PosteriorDenoiser,
    posterior_denoiser,
)
from cleanprior.posterior.loops import ILVR, MCG, DataConsistency, DiffPIR
from cleanprior.posterior.smc import TDS
from cleanprior.posterior.steps import PosteriorStep

__all__ = ["METHODS", "METHOD_TABLE", "check_observation", "method_options", "sample_posterior"]

METHOD_TABLE: dict[str, type[PosteriorDenoiser | PosteriorStep]] = {
    # guidance rules: posterior denoisers, run by the sampler named in sample_posterior
    "dps": DPS,
    "mmps": MMPS,
    "pigdm": PiGDM,
    "sda": SDA,
    "tmpd": TMPD,
    # a guidance rule (MMPS unless the option guidance names another) under the "pc" sampler
    "pc": MMPS,
    # sampler steps with a carried state
    "diffpir": DiffPIR,
    "dc": DataConsistency,
    "ilvr": ILVR,
    "mcg": MCG,
    "tds": TDS,
    "daps": DAPS,
    "pnpdm": PnPDM,
}
"""Every method of :func:`sample_posterior`, by name: its class, whose constructor's keyword-only
arguments are the method's options."""


def METHODS() -> list[str]:  # noqa: N802  (a function, as its callers know it)
    """The names ``sample_posterior`` accepts."""
    return sorted(METHOD_TABLE)


def method_options(method: str) -> set[str]:
    """The options a method takes by name (beyond the sampler's and the grid's).

    Read from the keyword-only arguments of the constructors of the method's class in
    :data:`METHOD_TABLE` (and of its bases), so that a caller can hand a method only the options
    it knows (e.g. ``solver`` and ``iterations`` to MMPS, not to DPS).

    Arguments:
        method: A name of :func:`METHODS`.

    Returns:
        The option names.

    Raises:
        ValueError: For an unknown method.
    """
    if method not in METHOD_TABLE:
        raise ValueError(f"unknown posterior method {method!r}; known methods: {', '.join(METHODS())}")
    constructors = [c.__init__ for c in METHOD_TABLE[method].__mro__ if "__init__" in vars(c)
                    and issubclass(c, (PosteriorDenoiser, PosteriorStep))]
    options = {p.name for f in constructors for p in inspect.signature(f).parameters.values()
               if p.kind == inspect.Parameter.KEYWORD_ONLY}
    return options | {"guidance"} if method == "pc" else options


def check_observation(A: Operator, y: Tensor, shape: Sequence[int], noise_std: float | Tensor) -> None:
    """Refuse, before any sampling, a ``y`` the operator cannot produce from signals of ``shape``.

    Raises:
        ValueError: Naming what disagrees.
    """
    if not isinstance(y, Tensor) or y.ndim < 1:
        raise ValueError("y must be a tensor of observations, batch first: shape (B, *y_shape)")
    if not torch.isfinite(torch.view_as_real(y) if y.is_complex() else y).all():
        raise ValueError("the observation y contains NaN or infinite values")
    expected, first_error = None, None
    # Signals are real for diffusion priors, but an operator may take complex images (MRI).
    for dtype in (y.real.dtype, torch.complex128 if y.real.dtype == torch.float64 else torch.complex64):
        try:
            with torch.no_grad():
                expected = A(torch.zeros((y.shape[0], *shape), dtype=dtype, device=y.device))
            break
        except (ValueError, RuntimeError) as error:
            first_error = first_error or error
    if expected is None:
        raise ValueError(f"the operator does not take signals of shape {tuple(shape)} for {y.shape[0]} observations: {first_error}")
    if expected.shape != y.shape:
        raise ValueError(
            f"y has shape {tuple(y.shape)} but the operator maps signals of shape {tuple(shape)} to "
            f"{tuple(expected.shape)}"
        )
    noise_std = torch.as_tensor(noise_std)
    if not (torch.isfinite(noise_std).all() and (noise_std > 0).all()):
        raise ValueError("noise_std must be positive and finite")


def sample_posterior(
    denoiser: Denoiser,
    forward: Operator | Any,
    y: Tensor,
    *,
    shape: Sequence[int],
    noise_std: float | Tensor,
    method: str = "mmps",
    steps: int = 64,
    sampler: str = "ddim",
    generator: torch.Generator | None = None,
    **options: Any,
) -> Tensor:
    r"""Draw one posterior sample :math:`x_i \sim q(x \mid y_i)` per observation.

    Arguments:
        denoiser: The prior denoiser ``D(x_t, sigma)``.
        forward: The forward model: an operator, a deepinv physics, or any differentiable
            callable (then only ``"dps"`` applies unless it is wrapped with
            ``as_operator(f, linear=True)``).
        y: Observations, shape ``(B, *y_shape)``; repeat it for several samples per observation.
        shape: The shape of one signal.
        noise_std: :math:`\sigma_y`, a float or shape ``(B,)``.
        method: ``"dps"``, ``"mmps"``, ``"pigdm"``, ``"sda"``, ``"tmpd"``, ``"pc"``, or a sampler
            step (``"diffpir"``, ``"dc"``, ``"ilvr"``, ``"mcg"``, ``"tds"``, ``"daps"``,
            ``"pnpdm"``); :data:`METHOD_TABLE` lists them.
        steps: The number of grid steps (below ``sigma_start`` when starting late).
        sampler: The sampler that runs a guidance rule (``ddim``, ``ddpm``, ``heun``, ``pc``).
        generator: The source of randomness; on the device of ``y`` it is used as it is, on
            another it seeds one there.
        options: The rule's options (``weight``, ``zeta``, ``solver``, ``iterations``,
            ``guidance`` for ``"pc"``); the sampler's (``eta``, ``corrections``, ``snr``); the
            grid's (``sigma_min``, ``sigma_max``, ``grid``, ``rho``); the CCDF start (``start``,
            ``sigma_start``); ``progress``; ``compile`` (run the prior denoiser under
            :func:`torch.compile`, off by default, see
            :func:`cleanprior.diffusion.samplers.compiled`). A sampler step's options are those
            of :func:`method_options`.

    Returns:
        Samples, shape ``(B, *shape)``.

    Raises:
        ValueError: For an unknown method, or a ``y`` that does not fit the operator and
            ``shape`` (before any sampling).
    """
    if method not in METHOD_TABLE:
        raise ValueError(f"unknown posterior method {method!r}; known methods: {', '.join(METHODS())}")
    A = as_operator(forward)
    shape = tuple(int(s) for s in shape)
    check_observation(A, y, shape, noise_std)

    sigma_min = float(options.pop("sigma_min", SIGMA_MIN))
    sigma_max = float(options.pop("sigma_max", SIGMA_MAX))
    grid = options.pop("grid", "edm")
    rho = float(options.pop("rho", 7.0))
    start = options.pop("start", None)
    sigma_start = options.pop("sigma_start", None)
    progress = bool(options.pop("progress", False))
    if options.pop("compile", False):
        denoiser = compiled(denoiser)
    sampler_options = {k: options.pop(k) for k in list(options) if k in SAMPLER_OPTIONS}

    dtype = y.real.dtype
    if start is not None:
        if sigma_start is None:
            raise ValueError("a CCDF start needs sigma_start, the level to start from")
        if isinstance(start, str):
            if start != "pinv":
                raise ValueError(f"start must be a tensor or 'pinv', got {start!r}")
            start = A.pinv(y) if getattr(A, "has_pinv", False) else A.adjoint(y)
        if tuple(start.shape) != (y.shape[0], *shape):
            raise ValueError(f"start must have shape {(y.shape[0], *shape)}, got {tuple(start.shape)}")
        sigma_max = float(sigma_start)
    sigmas = make_grid(steps, sigma_min, sigma_max, grid=grid, rho=rho)
    if generator is not None:
        generator = device_generator(generator, y.device)
    x_t = noisy_start(start, sigma_max, (y.shape[0], *shape), generator=generator, dtype=dtype, device=y.device)

    rule = METHOD_TABLE[method]
    if issubclass(rule, PosteriorStep):
        step = rule(**sampler_options, **options)
        return step(denoiser, A, y, noise_std, x_t, sigmas, generator=generator, progress=progress)
    if method == "pc":
        method = options.pop("guidance", "mmps")
        sampler = "pc"
    guided = posterior_denoiser(denoiser, A, y, noise_std=noise_std, method=method, **options)
    x = get_sampler(sampler, **sampler_options)(guided, x_t, sigmas, generator=generator, progress=progress)
    breakdowns = int(getattr(guided, "breakdowns", 0))
    if breakdowns:
        warnings.warn(
            f"{method}: the {guided.solver} solve broke down {breakdowns} times (per observation and step; "
            "non-positive curvature, so the denoiser's Jacobian is not positive definite there); those "
            "elements kept their last iterate. Try solver='gmres' or fewer iterations.",
            stacklevel=2,
        )
    return x
