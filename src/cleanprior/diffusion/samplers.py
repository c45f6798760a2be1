r"""Reverse-diffusion samplers that work from any denoiser.

Every sampler walks a decreasing grid :math:`\sigma_0 > \sigma_1 > \dots > \sigma_N = 0` with one
loop (:meth:`Sampler.__call__`) and differs only in its update :meth:`Sampler.step` from
:math:`\sigma_t` to :math:`\sigma_s < \sigma_t`. With :math:`d = D(x_t, \sigma_t)`:

- DDIM / DDPM (:class:`DDIM`):
  :math:`x_s = d + \sqrt{\sigma_s^2 - \tau^2}\,(x_t - d)/\sigma_t + \tau z`,
  :math:`\tau = \eta\, \sigma_s \sqrt{1 - \sigma_s^2/\sigma_t^2}`. :math:`\eta = 0` is the
  deterministic DDIM step (and Euler's step on the probability-flow ODE), :math:`\eta = 1` the
  ancestral DDPM step.
- Heun (:class:`Heun`): the second-order (trapezoidal) step on
  :math:`dx/d\sigma = (x - D(x, \sigma))/\sigma`.
- Predictor-corrector (:class:`PredictorCorrector`): a DDIM step followed by Langevin steps at
  the new level.

Because the denoiser is the only model they call, the same samplers draw from a prior (a trained
denoiser), from the exact mixture, or from a posterior (a guided denoiser). A posterior method
that changes the update itself (DiffPIR, data consistency, ILVR, MCG, TDS, DAPS, PnP-DM) is a step
with a carried state (:meth:`Sampler.init`, :meth:`Sampler.step`, :meth:`Sampler.finish`; see
:mod:`cleanprior.posterior.steps`) and runs in the same loop, so that the grid check, the CCDF
start (:func:`noisy_start`), the progress bar and the non-finite report are written once.

References:
    Song, Meng & Ermon (2021). Denoising Diffusion Implicit Models. https://arxiv.org/abs/2010.02502
    Ho, Jain & Abbeel (2020). Denoising Diffusion Probabilistic Models.
    Karras et al. (2022). Elucidating the Design Space of Diffusion-Based Generative Models,
    algorithm 1. https://arxiv.org/abs/2206.00364
    Song et al. (2021). Score-Based Generative Modeling through SDEs, algorithms 2 and 5.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from cleanprior.devices import device_generator
from cleanprior.diffusion.denoiser import Denoiser
from cleanprior.diffusion.schedules import SIGMA_MAX, SIGMA_MIN, make_grid

__all__ = [
    "CHECK_EVERY",
    "DDIM",
    "SAMPLERS",
    "SAMPLER_OPTIONS",
    "Heun",
    "NonFiniteError",
    "PredictorCorrector",
    "Sampler",
    "compiled",
    "ddim_step",
    "get_sampler",
    "noisy_start",
    "sample",
    "sample_prior",
]


class NonFiniteError(FloatingPointError):
    """A sampler produced NaN or infinite values."""


CHECK_EVERY = 16
"""Steps between two non-finite checks of :meth:`Sampler.__call__` (each one waits for the device)."""


class Sampler:
    r"""The reverse-diffusion loop. Subclasses define :meth:`step`.

    One loop (:meth:`__call__`) serves every sampler and every posterior method: it checks the
    grid, walks it behind an optional progress bar, and reports the first level whose step
    produced NaN or infinite values. A method that needs a state across steps (particles and
    weights, an auxiliary variable, a step counter) carries it: :meth:`init` makes it,
    :meth:`step` takes and returns it, :meth:`finish` turns the last one into the result. The
    prior samplers carry nothing.

    A sampler's options are fixed at construction; all its state between steps is the carry.
    """

    @property
    def label(self) -> str:
        """The name in messages and on the progress bar."""
        return type(self).__name__

    def init(
        self, denoiser: Denoiser, x_t: Tensor, levels: list[float], generator: torch.Generator | None
    ) -> tuple[Tensor, Any]:
        r"""The walk's first iterate and carry, from the start ``x_t`` (shape ``(B, *shape)``).

        Arguments:
            denoiser: The denoiser.
            x_t: Samples at ``levels[0]``, shape ``(B, *shape)``.
            levels: The checked grid.
            generator: The source of randomness.

        Returns:
            The iterate (``x_t`` itself here) and the carry (None here).
        """
        return x_t, None

    def walk(self, levels: list[float]) -> list[tuple[float, float]]:
        r"""The pairs :math:`(\sigma_t, \sigma_s)` the loop steps through: the grid's consecutive levels."""
        return list(zip(levels[:-1], levels[1:]))

    def step(
        self,
        denoiser: Denoiser,
        x_t: Tensor,
        sigma_t: float,
        sigma_s: float,
        carry: Any,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Any]:
        r"""One update from level :math:`\sigma_t` to :math:`\sigma_s < \sigma_t`.

        Arguments:
            denoiser: The denoiser.
            x_t: Current samples, shape ``(B, *shape)``.
            sigma_t: The current level (> 0).
            sigma_s: The next level (>= 0).
            carry: The state carried from the previous step (None for the prior samplers).
            generator: The source of randomness of stochastic steps.

        Returns:
            :math:`x_s`, shape ``(B, *shape)``, and the carry for the next step.
        """
        raise NotImplementedError

    def finite(self, x: Tensor, carry: Any) -> Tensor:
        """Whether a step's result is finite, as a boolean tensor on the device (no host sync)."""
        return torch.isfinite(x).all()

    def describe(self, sigma_t: float, sigma_s: float) -> str:
        """Where a step is, for the non-finite report."""
        return f"stepping from sigma={sigma_t:.4g} to sigma={sigma_s:.4g}"

    def postfix(self, carry: Any) -> dict[str, str]:
        """What the progress bar shows beside the step count (read only when the bar is shown)."""
        return {}

    def finish(self, x: Tensor, carry: Any, generator: torch.Generator | None) -> Any:
        """The result from the last iterate and carry: the samples ``x``, shape ``(B, *shape)``."""
        return x

    def evaluations(self, steps: int) -> int:
        """The number of denoiser evaluations per sample on a grid of ``steps`` steps."""
        return steps

    def __call__(
        self,
        denoiser: Denoiser,
        x_t: Tensor,
        sigmas: Tensor | Sequence[float],
        *,
        generator: torch.Generator | None = None,
        progress: bool = False,
        check_every: int = CHECK_EVERY,
    ) -> Any:
        r"""Run the reverse diffusion from ``x_t`` at ``sigmas[0]`` down the grid.

        Starting at an intermediate level with ``x_t = x0_hat + sigmas[0] * z`` is the CCDF
        shortcut (:func:`noisy_start`); starting at :math:`\sigma_{\max}` with pure noise samples
        from scratch.

        The finiteness of each step is folded into a flag on the device (the index of the first
        bad step), read every ``check_every`` steps and before :meth:`finish`, so that a step
        never waits for the device; a run that breaks down goes on for at most ``check_every``
        steps before the report names the step where it broke.

        Arguments:
            denoiser: The denoiser.
            x_t: Samples at level ``sigmas[0]``, shape ``(B, *shape)``.
            sigmas: Strictly decreasing levels, shape ``(N + 1,)``, usually ending at 0.
            generator: The source of randomness of stochastic steps.
            progress: Show a progress bar over the steps.
            check_every: Steps between two reads of the flag; 0 never checks, neither the start
                nor the steps (a walk inside another method's step, whose own loop checks it).

        Returns:
            The result of :meth:`finish`: samples at level ``sigmas[-1]``, shape ``(B, *shape)``.

        Raises:
            ValueError: If the grid is not strictly decreasing and non-negative, or ``x_t`` is
                not finite.
            NonFiniteError: If a step produces NaN or infinite values (the level is named).
        """
        if isinstance(check_every, bool) or not isinstance(check_every, int) or check_every < 0:
            raise ValueError(f"check_every must be a non-negative integer, got {check_every!r}")
        levels = [float(s) for s in torch.as_tensor(sigmas, dtype=torch.float64).flatten()]
        check_grid(levels)
        if check_every and not torch.isfinite(x_t).all():
            raise ValueError("the initial samples x_t contain NaN or infinite values")
        pairs = self.walk(levels)
        x, carry = self.init(denoiser, x_t, levels, generator)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(pairs), desc=self.label, unit="step", leave=False)
        # the index of the first step with non-finite values (len(pairs) while there is none)
        first_bad = torch.full((), len(pairs), dtype=torch.int64, device=x.device)
        try:
            for i, (sigma_t, sigma_s) in enumerate(pairs):
                x, carry = self.step(denoiser, x, sigma_t, sigma_s, carry, generator)
                if check_every:
                    unseen = first_bad == len(pairs)
                    first_bad = torch.where(unseen & ~self.finite(x, carry), i, first_bad)
                    if (i + 1) % check_every == 0 or i + 1 == len(pairs):
                        self._report(int(first_bad), pairs)
                if bar is not None:
                    bar.set_postfix(self.postfix(carry), refresh=False)
                    bar.update()
        finally:
            if bar is not None:
                bar.close()
        return self.finish(x, carry, generator)

    def _report(self, first_bad: int, pairs: list[tuple[float, float]]) -> None:
        if first_bad < len(pairs):
            raise NonFiniteError(f"{self.label} produced non-finite values {self.describe(*pairs[first_bad])}")

    def __repr__(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({options})"


def check_grid(levels: Sequence[float]) -> None:
    """Raise ValueError unless ``levels`` is a strictly decreasing, non-negative grid."""
    if len(levels) < 2:
        raise ValueError(f"a grid needs at least two levels, got {len(levels)}")
    if not all(math.isfinite(s) for s in levels) or levels[-1] < 0:
        raise ValueError(f"grid levels must be finite and non-negative, got {levels}")
    if any(b >= a for a, b in zip(levels[:-1], levels[1:])):
        raise ValueError("grid levels must be strictly decreasing")


def _denoise(denoiser: Denoiser, x: Tensor, sigma: float) -> Tensor:
    return denoiser(x, torch.full((x.shape[0],), sigma, dtype=x.dtype, device=x.device))


def _noise(x: Tensor, generator: torch.Generator | None) -> Tensor:
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)


class DDIM(Sampler):
    r"""The DDIM / DDPM family with stochasticity :math:`\eta`.

    .. math::
        x_s = d + \sqrt{\sigma_s^2 - \tau^2}\, \frac{x_t - d}{\sigma_t} + \tau z, \qquad
        \tau = \eta\, \sigma_s \sqrt{1 - \sigma_s^2 / \sigma_t^2}

    Arguments:
        eta: Stochasticity in :math:`[0, 1]`: 0 is deterministic DDIM (Euler on the
            probability-flow ODE), 1 is ancestral DDPM sampling.

    References:
        Song, Meng & Ermon (2021), eq. (12), in the variance-exploding parameterization.
    """

    def __init__(self, eta: float = 0.0) -> None:
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta must lie in [0, 1], got {eta}")
        self.eta = float(eta)

    def step(
        self,
        denoiser: Denoiser,
        x_t: Tensor,
        sigma_t: float,
        sigma_s: float,
        carry: Any,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Any]:
        return ddim_step(denoiser, x_t, sigma_t, sigma_s, self.eta, generator), carry


def ddim_step(
    denoiser: Denoiser,
    x_t: Tensor,
    sigma_t: float,
    sigma_s: float,
    eta: float,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""The DDIM / DDPM update :math:`x_s = d + \sqrt{\sigma_s^2 - \tau^2}\,(x_t - d)/\sigma_t + \tau z`.

    With :math:`d = D(x_t, \sigma_t)` and :math:`\tau = \eta\, \sigma_s \sqrt{1 - \sigma_s^2/\sigma_t^2}`;
    :math:`x_s = d` at :math:`\sigma_s = 0`. The step of :class:`DDIM`, shared with the posterior
    methods that follow it by a step toward the observation.

    Arguments:
        denoiser: The denoiser.
        x_t: Samples at :math:`\sigma_t`, shape ``(B, *shape)``.
        sigma_t: The current level (> 0).
        sigma_s: The next level (>= 0).
        eta: Stochasticity in :math:`[0, 1]`.
        generator: The source of randomness.

    Returns:
        :math:`x_s`, shape ``(B, *shape)``.
    """
    d = _denoise(denoiser, x_t, sigma_t)
    if sigma_s == 0:
        return d
    tau = eta * sigma_s * math.sqrt(1 - (sigma_s / sigma_t) ** 2)
    x_s = d + (math.sqrt(sigma_s**2 - tau**2) / sigma_t) * (x_t - d)
    if tau > 0:
        x_s = x_s + tau * _noise(x_t, generator)
    return x_s


class Heun(Sampler):
    r"""Heun's second-order step on the probability-flow ODE.

    With :math:`f(x, \sigma) = (x - D(x, \sigma)) / \sigma`:

    .. math::
        \tilde x_s = x_t + (\sigma_s - \sigma_t) f(x_t, \sigma_t), \qquad
        x_s = x_t + \tfrac12 (\sigma_s - \sigma_t)\big(f(x_t, \sigma_t) + f(\tilde x_s, \sigma_s)\big)

    The last step, to :math:`\sigma_s = 0`, is Euler's (:math:`f` is undefined at 0).
    Subclassed because the update itself needs a second denoiser evaluation.

    References:
        Karras et al. (2022), algorithm 1.
    """

    def step(
        self,
        denoiser: Denoiser,
        x_t: Tensor,
        sigma_t: float,
        sigma_s: float,
        carry: Any,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Any]:
        f_t = (x_t - _denoise(denoiser, x_t, sigma_t)) / sigma_t
        x_euler = x_t + (sigma_s - sigma_t) * f_t
        if sigma_s == 0:
            return x_euler, carry
        f_s = (x_euler - _denoise(denoiser, x_euler, sigma_s)) / sigma_s
        return x_t + (sigma_s - sigma_t) * 0.5 * (f_t + f_s), carry

    def evaluations(self, steps: int) -> int:
        return 2 * steps - 1


class PredictorCorrector(Sampler):
    r"""A DDIM predictor followed by Langevin corrector steps at each new level.

    After predicting :math:`x_s`, each correction is

    .. math:: x_s \leftarrow x_s + \delta\, s(x_s) + \sqrt{2 \delta}\, z, \qquad
              s(x) = \frac{D(x, \sigma_s) - x}{\sigma_s^2}, \qquad
              \delta = 2\, r^2 \sigma_s^2,

    a Langevin step that leaves :math:`p_{\sigma_s}` invariant as :math:`\delta \to 0`. The step
    follows Song et al.'s signal-to-noise rule :math:`\delta = 2 (r \|z\| / \|s\|)^2` with both
    norms replaced by their typical values :math:`\|z\|^2 = n` and
    :math:`\|s\|^2 = n / \sigma_s^2`, so that the step size does not depend on the random draw
    (a state-dependent step would bias the chain). No correction follows the last step to 0.

    Subclassed because the update itself adds denoiser evaluations after the predictor.

    Arguments:
        corrections: Langevin steps after each prediction.
        snr: The signal-to-noise ratio :math:`r` (step size); smaller is more accurate and
            slower to mix.
        eta: Stochasticity of the DDIM predictor.

    References:
        Song et al. (2021), algorithm 5; Rozet et al. (2024), DiEM, appendix C.
    """

    def __init__(self, corrections: int = 1, snr: float = 0.1, eta: float = 0.0) -> None:
        if isinstance(corrections, bool) or not isinstance(corrections, int) or corrections < 0:
            raise ValueError(f"corrections must be a non-negative integer, got {corrections!r}")
        if not snr > 0:
            raise ValueError(f"snr must be positive, got {snr}")
        self.corrections = corrections
        self.snr = float(snr)
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta must lie in [0, 1], got {eta}")
        self.eta = float(eta)

    def step(
        self,
        denoiser: Denoiser,
        x_t: Tensor,
        sigma_t: float,
        sigma_s: float,
        carry: Any,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Any]:
        x_s = ddim_step(denoiser, x_t, sigma_t, sigma_s, self.eta, generator)
        if sigma_s == 0:
            return x_s, carry
        delta = 2 * self.snr**2 * sigma_s**2
        for _ in range(self.corrections):
            s = (_denoise(denoiser, x_s, sigma_s) - x_s) / sigma_s**2
            x_s = x_s + delta * s + math.sqrt(2 * delta) * _noise(x_s, generator)
        return x_s, carry

    def evaluations(self, steps: int) -> int:
        return steps + self.corrections * (steps - 1)


SAMPLERS: dict[str, type[Sampler]] = {
    "ddim": DDIM,
    "ddpm": DDIM,
    "euler": DDIM,
    "heun": Heun,
    "pc": PredictorCorrector,
}


def get_sampler(name: str | Sampler, **options: Any) -> Sampler:
    """A sampler by name: ``ddim``, ``ddpm`` (DDIM with ``eta=1``), ``euler``, ``heun``, ``pc``.

    Arguments:
        name: The sampler's name, or a sampler (returned as is; then no options are allowed).
        options: The sampler's constructor options (``eta``, ``corrections``, ``snr``).

    Raises:
        ValueError: For an unknown name.
        TypeError: For an option the sampler does not take.
    """
    if isinstance(name, Sampler):
        if options:
            raise TypeError(f"options {sorted(options)} given with an already built sampler {name}")
        return name
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; known samplers: {sorted(SAMPLERS)}")
    if name == "ddpm":
        options.setdefault("eta", 1.0)
    cls = SAMPLERS[name]
    try:
        return cls(**options)
    except TypeError as error:
        raise TypeError(f"sampler {name!r} does not take these options {sorted(options)}: {error}") from None


def _default_device(denoiser: Denoiser, generator: torch.Generator | None) -> torch.device:
    # where the network is first: a CPU generator must not move the sampling off the GPU
    if isinstance(denoiser, nn.Module):
        for tensor in denoiser.parameters():
            return tensor.device
    return generator.device if generator is not None else torch.device("cpu")


def noisy_start(
    x0_hat: Tensor | None,
    sigma: float,
    shape: Sequence[int],
    *,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    r"""The start of a walk at level :math:`\sigma`: :math:`x_\sigma = \hat x_0 + \sigma z`.

    Without ``x0_hat`` this is pure noise :math:`\sigma_{\max} z`, the start from scratch; with an
    estimate (e.g. :math:`A^+ y`) it is CCDF's shortcut, which runs only the grid below
    :math:`\sigma`.

    Arguments:
        x0_hat: An initial estimate, shape ``(B, *shape)``, or None.
        sigma: The starting level.
        shape: ``(B, *shape)``, the shape of the start.
        generator: The source of randomness.
        dtype: The dtype of the start.
        device: Its device (that of ``x0_hat`` when given).

    Returns:
        Shape ``(B, *shape)``.

    References:
        Chung et al. (2022). Come-Closer-Diffuse-Faster, eq. (8). https://arxiv.org/abs/2112.05146
    """
    if x0_hat is None:
        return sigma * torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)
    z = torch.randn(x0_hat.shape, generator=generator, dtype=dtype, device=x0_hat.device)
    return x0_hat.to(dtype) + sigma * z


def compiled(denoiser: Denoiser) -> Denoiser:
    """The denoiser under :func:`torch.compile`, its graph built on the first call.

    Compiling pays off for a network on a GPU called at many levels; it costs a compilation per
    new input shape (the last, smaller batch of a chunked run is one), so it is an option rather
    than the default. The guidance rules differentiate through the compiled call by backward
    products only, which compiled graphs support.
    """
    return torch.compile(denoiser, dynamic=False)


SAMPLER_OPTIONS = {"eta", "corrections", "snr"}
"""The options that configure a sampler (the rest of an options dict goes to the grid or a method)."""


def sample(
    denoiser: Denoiser,
    x_t: Tensor,
    sigmas: Tensor | Sequence[float],
    *,
    sampler: str | Sampler = "ddim",
    generator: torch.Generator | None = None,
    progress: bool = False,
    **options: Any,
) -> Tensor:
    r"""Run a sampler by name from ``x_t`` down the grid ``sigmas``.

    Arguments:
        denoiser: Any denoiser.
        x_t: Samples at level ``sigmas[0]``, shape ``(B, *shape)``.
        sigmas: Decreasing levels, shape ``(N + 1,)``.
        sampler: A sampler's name (see :func:`get_sampler`) or a sampler.
        generator: The source of randomness.
        progress: Show a progress bar.
        options: The sampler's options.

    Returns:
        Samples, shape ``(B, *shape)``.
    """
    return get_sampler(sampler, **options)(
        denoiser, x_t, sigmas, generator=generator, progress=progress
    )


@torch.no_grad()
def sample_prior(
    denoiser: Denoiser,
    n: int,
    *,
    shape: Sequence[int],
    steps: int = 64,
    sampler: str | Sampler = "ddim",
    sigma_min: float = SIGMA_MIN,
    sigma_max: float = SIGMA_MAX,
    generator: torch.Generator | None = None,
    **options: Any,
) -> Tensor:
    r"""Draw ``n`` samples from the prior a denoiser defines.

    Starts from :math:`x \sim \mathcal{N}(0, \sigma_{\max}^2 I)` and runs the reverse diffusion
    down an EDM grid (:math:`\rho = 7`) from :math:`\sigma_{\max}` to :math:`\sigma_{\min}`, then
    to 0. The defaults suit data scaled to about [-1, 1]: :math:`\sigma_{\max} = 80` hides the data
    entirely and :math:`\sigma_{\min} = 0.002` is below an 8-bit quantisation step.

    Arguments:
        denoiser: Any denoiser ``D(x_t, sigma)``.
        n: The number of samples.
        shape: The shape of one sample, e.g. ``(5,)`` or ``(1, 28, 28)``.
        steps: The number of grid steps.
        sampler: ``"ddim"``, ``"ddpm"``, ``"euler"``, ``"heun"``, ``"pc"``, or a sampler.
        sigma_min: The last non-zero level.
        sigma_max: The first level.
        generator: The source of randomness; on the sampling device (that of the denoiser's
            parameters by default) it is used as it is, on another it seeds one there.
        options: ``eta``, ``corrections``, ``snr`` (sampler options); ``grid`` (``"edm"`` or
            ``"exponential"``) and ``rho`` (grid options); ``device``, ``dtype``,
            ``batch_size`` (samples per denoiser call, to bound memory), ``progress`` and
            ``compile`` (run the denoiser under :func:`torch.compile`, see :func:`compiled`;
            off by default).

    Returns:
        Samples, shape ``(n, *shape)``.

    Example:
        >>> from cleanprior.reference import GaussianMixture
        >>> prior = GaussianMixture.isotropic(torch.tensor([[-1.0], [1.0]]), 0.1)
        >>> x = sample_prior(prior.denoiser, 8, shape=(1,), steps=32)
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    shape = tuple(int(s) for s in shape)
    sampler_options = {k: options.pop(k) for k in list(options) if k in SAMPLER_OPTIONS}
    grid = options.pop("grid", "edm")
    rho = options.pop("rho", 7.0)
    device = torch.device(options.pop("device", None) or _default_device(denoiser, generator))
    dtype = options.pop("dtype", torch.float32)
    batch_size = int(options.pop("batch_size", n))
    progress = bool(options.pop("progress", False))
    if options.pop("compile", False):
        denoiser = compiled(denoiser)
    if options:
        raise TypeError(f"sample_prior got unknown options {sorted(options)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    runner = get_sampler(sampler, **sampler_options)
    sigmas = make_grid(steps, sigma_min, sigma_max, grid=grid, rho=rho)
    if generator is not None:
        generator = device_generator(generator, device)

    chunks = []
    for start in range(0, n, batch_size):
        size = min(batch_size, n - start)
        x_T = noisy_start(None, sigma_max, (size, *shape), generator=generator, dtype=dtype, device=device)
        chunks.append(runner(denoiser, x_T, sigmas, generator=generator, progress=progress))
    return torch.cat(chunks)
