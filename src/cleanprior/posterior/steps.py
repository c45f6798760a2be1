r"""A posterior method as a step of the one sampling loop, with a carried state.

A posterior method that is not a denoiser wrapper (:mod:`cleanprior.posterior.guidance`) changes
the update itself: DiffPIR's proximal step, the projections of data consistency, ILVR and MCG,
TDS's weighted particles, DAPS's and PnP-DM's auxiliary variable. Each is a
:class:`PosteriorStep`: its options are fixed (and checked) at construction, it is bound to an
observation :math:`y = A x + n`, :math:`n \sim \mathcal{N}(0, \sigma_y^2 I)`, for one call, and the
loop of :class:`cleanprior.diffusion.samplers.Sampler` runs it through :class:`Conditioned`, so
that the grid check, the progress bar and the non-finite report are those of every sampler.

References:
    Zhu et al. (2023), DiffPIR; Chung & Ye (2022), score-MRI; Choi et al. (2021), ILVR;
    Chung et al. (2022), MCG; Wu et al. (2023), TDS; Zhang et al. (2025), DAPS; Wu et al. (2024),
    PnP-DM: see the modules of each method.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from cleanprior.diffusion.denoiser import Denoiser
from cleanprior.diffusion.samplers import Sampler
from cleanprior.operators.base import Operator, as_operator

__all__ = ["Conditioned", "Observation", "PosteriorStep", "per_item"]


def per_item(value: Tensor, like: Tensor) -> Tensor:
    """A scalar or per-observation ``(B,)`` value shaped to multiply ``like``, ``(B, ...)``."""
    return value.reshape((-1,) + (1,) * (like.ndim - 1)) if value.ndim > 0 else value


class Observation(NamedTuple):
    r"""What a posterior step conditions on.

    Attributes:
        A: The forward operator; its parameters carry a leading batch dimension when they
            differ per observation.
        y: Observations, shape ``(B, *y_shape)``.
        noise_std: :math:`\sigma_y`, a float or shape ``(B,)``.
    """

    A: Operator
    y: Tensor
    noise_std: float | Tensor


class PosteriorStep:
    r"""A posterior method as a sampler step: :meth:`init`, :meth:`step`, :meth:`finish`.

    The hooks are those of :class:`cleanprior.diffusion.samplers.Sampler` with the observation
    added; the constructor takes the method's options only (they are what
    :func:`cleanprior.posterior.api.method_options` lists). Calling the step runs it through the
    one loop.
    """

    label = "posterior step"
    """The name in messages and on the progress bar."""

    def check(self, A: Operator) -> None:
        """Refuse, before any sampling, an operator the method cannot use (ValueError, TypeError)."""

    def init(
        self,
        denoiser: Denoiser,
        observation: Observation,
        x_t: Tensor,
        levels: list[float],
        generator: torch.Generator | None,
    ) -> tuple[Tensor, Any]:
        """The first iterate and carry from ``x_t``, shape ``(B, *shape)``; see :meth:`Sampler.init`."""
        return x_t, None

    def walk(self, levels: list[float]) -> list[tuple[float, float]]:
        """The pairs of levels the loop steps through; see :meth:`Sampler.walk`."""
        return list(zip(levels[:-1], levels[1:]))

    def step(
        self,
        denoiser: Denoiser,
        observation: Observation,
        x_t: Tensor,
        sigma_t: float,
        sigma_s: float,
        carry: Any,
        generator: torch.Generator | None,
    ) -> tuple[Tensor, Any]:
        """One update with its carry; see :meth:`Sampler.step`."""
        raise NotImplementedError

    def finite(self, x: Tensor, carry: Any) -> Tensor:
        """Whether a step's result is finite, a boolean tensor on the device."""
        return torch.isfinite(x).all()

    def describe(self, sigma_t: float, sigma_s: float) -> str:
        """Where a step is, for the non-finite report."""
        return f"stepping from sigma={sigma_t:.4g} to sigma={sigma_s:.4g}"

    def postfix(self, carry: Any) -> dict[str, str]:
        """What the progress bar shows (read only when it is shown)."""
        return {}

    def finish(
        self, observation: Observation, x: Tensor, carry: Any, generator: torch.Generator | None
    ) -> Any:
        """The result, by default the samples ``x``, shape ``(B, *shape)``."""
        return x

    def __call__(
        self,
        denoiser: Denoiser,
        A: Operator | Any,
        y: Tensor,
        noise_std: float | Tensor,
        x_t: Tensor,
        sigmas: Tensor | list[float],
        *,
        generator: torch.Generator | None = None,
        progress: bool = False,
    ) -> Any:
        r"""Run the method down the grid from ``x_t``, through the one sampling loop.

        Arguments:
            denoiser: The prior denoiser.
            A: The forward model.
            y: Observations, shape ``(B, *y_shape)``.
            noise_std: :math:`\sigma_y`, a float or shape ``(B,)``.
            x_t: Samples at ``sigmas[0]``, shape ``(B, *shape)``.
            sigmas: Decreasing levels, shape ``(N + 1,)``.
            generator: The source of randomness.
            progress: Show a progress bar.

        Returns:
            Samples, shape ``(B, *shape)`` (see :meth:`finish`).

        Raises:
            ValueError: For an operator, grid or start the method cannot use (before sampling).
            NonFiniteError: If a step produces NaN or infinite values (the level is named).
        """
        A = as_operator(A)
        self.check(A)
        bound = Conditioned(self, Observation(A, y, noise_std))
        return bound(denoiser, x_t, sigmas, generator=generator, progress=progress)

    def __repr__(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if k != "evaluations")
        return f"{type(self).__name__}({options})"


class Conditioned(Sampler):
    """A posterior step bound to its observation: the sampler that the one loop runs.

    Arguments:
        method: The posterior step.
        observation: What it conditions on.
    """

    def __init__(self, method: PosteriorStep, observation: Observation) -> None:
        self.method = method
        self.observation = observation

    @property
    def label(self) -> str:
        return self.method.label

    def init(
        self, denoiser: Denoiser, x_t: Tensor, levels: list[float], generator: torch.Generator | None
    ) -> tuple[Tensor, Any]:
        return self.method.init(denoiser, self.observation, x_t, levels, generator)

    def walk(self, levels: list[float]) -> list[tuple[float, float]]:
        return self.method.walk(levels)

    def step(
        self,
        denoiser: Denoiser,
        x_t: Tensor,
        sigma_t: float,
        sigma_s: float,
        carry: Any,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Any]:
        return self.method.step(denoiser, self.observation, x_t, sigma_t, sigma_s, carry, generator)

    def finite(self, x: Tensor, carry: Any) -> Tensor:
        return self.method.finite(x, carry)

    def describe(self, sigma_t: float, sigma_s: float) -> str:
        return self.method.describe(sigma_t, sigma_s)

    def postfix(self, carry: Any) -> dict[str, str]:
        return self.method.postfix(carry)

    def finish(self, x: Tensor, carry: Any, generator: torch.Generator | None) -> Any:
        return self.method.finish(self.observation, x, carry, generator)

    def __repr__(self) -> str:
        return f"Conditioned({self.method!r})"
