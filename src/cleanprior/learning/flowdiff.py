r"""FlowDiff: a conditional normalizing flow and a diffusion prior, trained together.

A conditional flow :math:`q_\phi(x \mid y)` (:class:`~cleanprior.nn.flow.ConditionalFlow`)
amortizes posterior inference; a diffusion prior :math:`p_\theta` learns from the flow's samples.
Per observation :math:`y = A x + n`, :math:`n \sim \mathcal{N}(0, \sigma_y^2 I)`, the flow minimises

.. math::
    \ell_\phi(y) = \mathbb{E}_{x \sim q_\phi(\cdot \mid y)} \Big[ \frac{\|y - A x\|^2}{2 \sigma_y^2}
        + B_\theta(x) + \log q_\phi(x \mid y) \Big]
    \;=\; \mathrm{KL}\big(q_\phi(\cdot \mid y) \,\|\, p_\theta(\cdot \mid y)\big) + \text{const}
    \quad \text{(when } B_\theta = -\log p_\theta + \text{const)},

with :math:`-\log p_\theta(x)` replaced by the score-matching bound :math:`B_\theta(x)` of Song et
al. (2021) (:func:`score_matching_bound`): for the variance-exploding diffusion
:math:`x_\sigma = x + \sigma \epsilon` and the score :math:`s_\theta = (D_\theta(x_\sigma, \sigma) -
x_\sigma) / \sigma^2`, their theorem 3 (:math:`f = 0`, :math:`g^2\,dt = d\sigma^2 = 2\sigma\,d\sigma`,
:math:`\nabla \log p(x_\sigma \mid x) = -\epsilon / \sigma`) reads

.. math::
    -\log p_\theta(x) \leq \int_{\sigma_{\min}}^{\sigma_{\max}} \mathbb{E}_\epsilon \Big[
        \|D_\theta(x + \sigma\epsilon, \sigma) - x\|^2 - \sigma^2 \|\epsilon\|^2 \Big] \frac{d\sigma}{\sigma^3}
        + \frac{\|x\|^2}{2 \sigma_{\max}^2} + \text{const},

the last term from the prior :math:`\mathcal{N}(0, \sigma_{\max}^2 I)` at the top level. With
:math:`\sigma` drawn log-uniformly on :math:`[\sigma_{\min}, \sigma_{\max}]` (density
:math:`1 / (\sigma \log(\sigma_{\max} / \sigma_{\min}))`), the integral is
:math:`\mathbb{E}_{\sigma, \epsilon}[w(\sigma) (\|D_\theta - x\|^2 - \sigma^2 \|\epsilon\|^2)]` with the
likelihood weight

.. math:: w(\sigma) = \frac{\log(\sigma_{\max} / \sigma_{\min})}{\sigma^2}.

The :math:`-\sigma^2 \|\epsilon\|^2` term does not depend on :math:`x` (nor on any parameter) but
cancels the noise of :math:`\|D_\theta - x\|^2 \approx \sigma^2 \|\epsilon\|^2` at small
:math:`\sigma`, where :math:`w` is huge. For a Gaussian prior :math:`\mathcal{N}(\mu, \Sigma)` and
its exact denoiser the bound is tight: it equals
:math:`\tfrac12 (x - \mu)^\top (\Sigma + \sigma_{\min}^2 I)^{-1} (x - \mu)` up to a constant and
terms of order :math:`\|x\|^2 \|\Sigma\| / \sigma_{\max}^4`, so the flow loss is then exactly
:math:`\mathrm{KL}` to the posterior up to a constant.

Training alternates a flow step (the prior fixed; gradients reach :math:`x` through the prior,
whose parameters are not updated) and ``prior_steps_per_flow_step`` prior steps (plain denoising
score matching, :func:`~cleanprior.diffusion.training.dsm_loss`, on fresh flow samples, detached;
the paper drops the likelihood weight there, after Kingma & Gao). As in the paper, the flow can be
reset to fresh weights (and a fresh optimiser) every ``reset_flow_every`` steps and the prior every
``reset_prior_every`` steps, so that each retrains against the other and escapes the memorisation
of early, poor samples.

The flow is conditioned on :math:`c = [A^\top y,\; A^\top A \mathbf{1}]` (:func:`condition`),
concatenated along channels (features, for vectors): the back-projected observation, and where and
how strongly the operator sees (the mask itself for a mask; for a blur, a constant that falls
off at zero-padded borders).

References:
    Wang et al. (2024). Integrating Amortized Inference with Diffusion Models for Learning Clean
    Distribution from Corrupted Images (FlowDiff), sections 3.1 to 3.3.
    https://arxiv.org/abs/2407.11162
    Song, Durkan, Murray & Ermon (2021). Maximum Likelihood Training of Score-Based Diffusion
    Models, theorem 3 (the bound for one data point). https://arxiv.org/abs/2101.09258
    Roeder, Wu & Duvenaud (2017). Sticking the Landing: Simple, Lower-Variance Gradient
    Estimators for Variational Inference. https://arxiv.org/abs/1703.09194
    Kingma & Gao (2023). Understanding Diffusion Objectives as the ELBO with Simple Data
    Augmentation. https://arxiv.org/abs/2303.00848
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from cleanprior import distributed
from cleanprior.data.files import Observations
from cleanprior.diffusion.denoiser import Denoiser, expand_sigma
from cleanprior.diffusion.precondition import PreconditionedDenoiser
from cleanprior.diffusion.schedules import SIGMA_MAX, SIGMA_MIN
from cleanprior.diffusion.training import TrainConfig, dsm_loss, sample_sigma
from cleanprior.learning.rounds import round_generator
from cleanprior.nn.flow import ConditionalFlow
from cleanprior.operators.base import Operator, as_operator
from cleanprior.training.loop import Update, optimize

__all__ = ["FlowDiff", "FlowDiffConfig", "FlowDiffMethod", "condition", "flowdiff_loss", "make_flow",
           "score_matching_bound"]

# Purposes of the per-step generators (round_generator keys), so that every draw of step s depends
# only on (seed, purpose, s): a run resumed at any step, or run in chunks, draws the same numbers.
_FLOW_BATCH, _FLOW_DRAWS, _PRIOR_BATCH, _PRIOR_DRAWS, _FLOW_RESET, _PRIOR_RESET = range(6)


@dataclasses.dataclass
class FlowDiffConfig:
    r"""Options of FlowDiff's joint training.

    Attributes:
        steps: Training steps (:meth:`FlowDiff.run` stops there unless told otherwise); a step is
            one flow step and ``prior_steps_per_flow_step`` prior steps.
        batch_size: Observations per minibatch (one flow sample each).
        flow_lr: Adam's learning rate for the flow.
        prior_lr: Adam's learning rate for the prior.
        prior_steps_per_flow_step: Prior steps after every flow step; 0 keeps the prior fixed (a
            known or pre-trained prior; then it may be any denoiser).
        reset_flow_every: Re-initialise the flow (and its optimiser) before every step that is a
            positive multiple of this (0: never).
        reset_prior_every: The same for the prior, its EMA and its optimiser (0: never).
        ema_decay: Decay of the prior's exponential moving average, in [0, 1).
        bound_levels: Noise levels per flow sample in the score-matching bound (stratified in
            :math:`\log \sigma`).
        sigma_min: The bound's smallest level.
        sigma_max: The bound's largest level.
        p_mean: Mean of :math:`\log \sigma` for the prior's denoising score matching (EDM).
        p_std: Standard deviation of :math:`\log \sigma` for the prior's denoising score matching.
        clip: Maximum gradient norm of each model per step (0 disables clipping).
        path_gradient: Use the path-derivative (sticking the landing) gradient of the flow's
            entropy term (see :func:`flowdiff_loss`).
        hidden: The flow's width (:func:`make_flow`).
        layers: The flow's channel steps (:func:`make_flow`).
        checkerboard: The flow's full-resolution checkerboard steps (:func:`make_flow`).
        blocks: Residual blocks per coupling conditioner (:func:`make_flow`).
        seed: The run's seed: every step's minibatches and draws, and every reset's fresh
            weights, derive from it and the step number.
    """

    steps: int = 10_000
    batch_size: int = 64
    flow_lr: float = 1e-3
    prior_lr: float = 1e-3
    prior_steps_per_flow_step: int = 1
    reset_flow_every: int = 0
    reset_prior_every: int = 0
    ema_decay: float = 0.999
    bound_levels: int = 4
    sigma_min: float = SIGMA_MIN
    sigma_max: float = SIGMA_MAX
    p_mean: float = -1.2
    p_std: float = 1.2
    clip: float = 1.0
    path_gradient: bool = True
    hidden: int = 64
    layers: int = 8
    checkerboard: int = 2
    blocks: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        least = {"steps": 0, "batch_size": 1, "prior_steps_per_flow_step": 0, "reset_flow_every": 0,
                 "reset_prior_every": 0, "bound_levels": 1, "hidden": 1, "layers": 0, "checkerboard": 0,
                 "blocks": 0, "seed": 0}
        for name, bound in least.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < bound:
                raise ValueError(f"FlowDiffConfig.{name} must be an integer >= {bound}, got {value!r}")
        for name in ("flow_lr", "prior_lr", "sigma_min", "p_std"):
            if not getattr(self, name) > 0:
                raise ValueError(f"FlowDiffConfig.{name} must be positive, got {getattr(self, name)}")
        if not self.sigma_max > self.sigma_min:
            raise ValueError(f"FlowDiffConfig needs sigma_max > sigma_min, got {self.sigma_max} and {self.sigma_min}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"FlowDiffConfig.ema_decay must lie in [0, 1), got {self.ema_decay}")
        if not self.clip >= 0:
            raise ValueError(f"FlowDiffConfig.clip must be non-negative, got {self.clip}")
        if not isinstance(self.path_gradient, bool):
            raise TypeError(f"FlowDiffConfig.path_gradient must be a bool, got {self.path_gradient!r}")


def make_flow(shape: Sequence[int], config: FlowDiffConfig | None = None) -> ConditionalFlow:
    """A flow for signals of ``shape``, conditioned as :func:`condition` does (twice the channels).

    Arguments:
        shape: One signal's shape, ``(C, H, W)`` or ``(d,)``.
        config: Its ``hidden``, ``layers``, ``checkerboard`` and ``blocks`` set the architecture.

    Returns:
        An untrained flow (the identity map).
    """
    config = config or FlowDiffConfig()
    shape = tuple(int(s) for s in shape)
    return ConditionalFlow(shape, 2 * shape[0], hidden=config.hidden, layers=config.layers,
                           checkerboard=config.checkerboard, blocks=config.blocks)


def condition(A: Operator | Any, y: Tensor, shape: Sequence[int]) -> Tensor:
    r"""The flow's condition :math:`c = [A^\top y,\; A^\top A \mathbf{1}]`, concatenated along channels.

    Arguments:
        A: A linear operator of ``B`` observations (or one shared by all).
        y: Observations, shape ``(B, *y_shape)``.
        shape: One signal's shape, ``(C, H, W)`` or ``(d,)``.

    Returns:
        :math:`c`, shape ``(B, 2C, H, W)`` or ``(B, 2d)``, real.

    Raises:
        TypeError: If ``A`` is not linear (it has no adjoint).
        ValueError: If ``A^\top y`` is not a real signal of ``shape``.
    """
    A = as_operator(A)
    if not A.linear:
        raise TypeError(f"FlowDiff conditions on A^T y: the operator {A._label()!r} must be linear")
    shape = tuple(int(s) for s in shape)
    if not isinstance(y, Tensor) or y.ndim < 1:
        raise ValueError(f"y must be a tensor of shape (B, *y_shape), got {type(y).__name__}")
    back = A.adjoint(y)
    if back.is_complex() or tuple(back.shape) != (y.shape[0], *shape):
        raise ValueError(f"A^T y must be a real signal of shape (B, {', '.join(map(str, shape))}), "
                         f"got {tuple(back.shape)} of {back.dtype}")
    ones = torch.ones((y.shape[0], *shape), dtype=back.dtype, device=back.device)
    return torch.cat([back, A.adjoint(A(ones)).to(back.dtype)], dim=1)


def score_matching_bound(
    prior: Denoiser,
    x: Tensor,
    *,
    levels: int = 4,
    sigma_min: float = SIGMA_MIN,
    sigma_max: float = SIGMA_MAX,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""A one-sample estimate of Song et al.'s bound :math:`B_\theta(x) \geq -\log p_\theta(x) + \text{const}`.

    .. math::
        \hat B(x) = \frac1K \sum_{k=1}^K w(\sigma_k) \big(\|D(x + \sigma_k \epsilon_k, \sigma_k) - x\|^2
            - \sigma_k^2 \|\epsilon_k\|^2\big) + \frac{\|x\|^2}{2 \sigma_{\max}^2},
        \qquad w(\sigma) = \frac{\log(\sigma_{\max} / \sigma_{\min})}{\sigma^2},

    with :math:`\log \sigma_k` stratified: uniform on the :math:`k`-th of :math:`K` equal parts of
    :math:`[\log \sigma_{\min}, \log \sigma_{\max}]` (unbiased, with less variance than :math:`K`
    independent levels). Differentiable in ``x`` and in the prior's parameters.

    Arguments:
        prior: The prior denoiser :math:`D(x_\sigma, \sigma)`.
        x: Points, shape ``(B, *shape)``.
        levels: :math:`K \geq 1`.
        sigma_min: The smallest level, positive.
        sigma_max: The largest level, above ``sigma_min``.
        generator: The source of the levels and of :math:`\epsilon` (on the device of ``x``).

    Returns:
        :math:`\hat B(x)` in nats, shape ``(B,)``.

    Raises:
        ValueError: For levels or a range out of bounds.
    """
    if isinstance(levels, bool) or not isinstance(levels, int) or levels < 1:
        raise ValueError(f"levels must be a positive integer, got {levels!r}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min} and {sigma_max}")
    batch = x.shape[0]
    log_range = math.log(sigma_max / sigma_min)
    u = torch.rand((batch, levels), generator=generator, device=x.device, dtype=x.dtype)
    u = (torch.arange(levels, device=x.device, dtype=x.dtype) + u) / levels
    sigma = torch.exp(math.log(sigma_min) + log_range * u).reshape(-1)
    x_rep = x.repeat_interleave(levels, 0)
    eps = torch.randn(x_rep.shape, generator=generator, device=x.device, dtype=x.dtype)
    noise = expand_sigma(sigma, x_rep) * eps
    x_t = x_rep + noise
    r = prior(x_t, sigma) - x_t
    # ||D - x||^2 - ||sigma eps||^2 as (D - x_t).(D - x_t + 2 sigma eps): no cancellation of two
    # large numbers at small sigma
    excess = (r * (r + 2 * noise)).flatten(1).sum(1)
    integral = (log_range / sigma**2 * excess).reshape(batch, levels).mean(1)
    return integral + x.flatten(1).pow(2).sum(1) / (2 * sigma_max**2)


def _noise_std(noise_std: float | Tensor, batch: int, like: Tensor) -> Tensor:
    r""":math:`\sigma_y` as one positive value per observation, shape ``(B,)``."""
    std = torch.as_tensor(noise_std, dtype=like.real.dtype, device=like.device)
    if std.ndim > 1 or (std.ndim == 1 and std.shape[0] not in (1, batch)):
        raise ValueError(f"noise_std must be a float or one value per observation ({batch},), "
                         f"got shape {tuple(std.shape)}")
    if not (torch.isfinite(std).all() and (std > 0).all()):
        raise ValueError("FlowDiff's likelihood ||y - A x||^2 / (2 sigma_y^2) needs noise_std > 0 and finite")
    return std.expand(batch)


def flowdiff_loss(
    flow: ConditionalFlow,
    prior: Denoiser,
    A: Operator | Any,
    y: Tensor,
    noise_std: float | Tensor,
    c: Tensor | None = None,
    *,
    levels: int = 4,
    sigma_min: float = SIGMA_MIN,
    sigma_max: float = SIGMA_MAX,
    path_gradient: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""The flow's loss per observation, one reparameterised sample each.

    .. math::
        \hat\ell(y) = \frac{\|y - A x\|^2}{2 \sigma_y^2} + \hat B(x) + \log q_\phi(x \mid y),
        \qquad x \sim q_\phi(\cdot \mid y),

    an unbiased estimate of :math:`\mathrm{KL}(q_\phi \| p_\theta(\cdot \mid y))` plus a constant
    (the evidence and the bound's constant), with :math:`\hat B` of :func:`score_matching_bound`.
    Gradients flow to the flow's parameters and, through :math:`x`, through the prior (whose
    parameters the caller leaves alone).

    Arguments:
        flow: The conditional flow.
        prior: The prior denoiser.
        A: The forward model of the ``B`` observations (linear).
        y: Observations, shape ``(B, *y_shape)``.
        noise_std: :math:`\sigma_y > 0`, a float or shape ``(B,)``.
        c: The condition (:func:`condition` of ``A`` and ``y`` when omitted).
        levels: Noise levels per sample in the bound.
        sigma_min: The bound's smallest level.
        sigma_max: The bound's largest level.
        path_gradient: Differentiate :math:`\log q_\phi` only through the sample :math:`x`
            (Roeder et al.'s "sticking the landing" estimator: the same value and expected
            gradient, no gradient noise at :math:`q_\phi = p_\theta(\cdot \mid y)`), at the
            cost of one inverse pass of the flow.
        generator: The source of the flow's and the bound's draws (on the flow's device).

    Returns:
        The loss in nats, shape ``(B,)``.

    Raises:
        ValueError: For a non-positive ``noise_std`` or shapes that disagree.
    """
    A = as_operator(A)
    std = _noise_std(noise_std, y.shape[0], y)
    c = condition(A, y, flow.shape) if c is None else c
    x, log_q = flow.sample(c, generator)
    if path_gradient:
        # Sticking the landing: the score term E[grad_phi log q_phi(x)] (x held fixed) is zero in
        # expectation but not per sample, and its variance does not vanish as q reaches the
        # posterior; keeping only the path derivative through x makes the gradient exactly zero there.
        held = flow.log_prob(x.detach(), c)
        log_q = log_q - held + held.detach()
    r = y - A(x)
    data = torch.real(torch.conj(r) * r).flatten(1).sum(1) / (2 * std**2)
    bound = score_matching_bound(prior, x, levels=levels, sigma_min=sigma_min, sigma_max=sigma_max, generator=generator)
    return data + bound + log_q


class FlowDiff:
    r"""A conditional flow and a diffusion prior, trained by alternating updates in the one training loop.

    Training runs in chunks (:meth:`run` up to a step), resumes exactly from :meth:`state_dict`,
    and every draw of step :math:`s` comes from generators seeded by ``(config.seed, s)``, so a run
    gives the same result whatever its chunks.

    Arguments:
        flow: The conditional flow, conditioned as :func:`condition` (:func:`make_flow` builds one).
        prior: The prior: a :class:`~cleanprior.diffusion.precondition.PreconditionedDenoiser`
            to train, on the flow's device; with ``config.prior_steps_per_flow_step = 0`` any fixed
            denoiser.
        config: The options (defaults of :class:`FlowDiffConfig` when omitted).

    Attributes:
        flow: The flow (reset in place: references stay valid).
        prior: The prior being trained (reset in place).
        ema: The prior's EMA, or None for a fixed prior.
        optimizers: The states of the flow's and the prior's AdamW (the one training loop's), or
            None for a fresh one (after a reset).
        step: Steps done.
        resets: ``(step, "flow" | "prior")`` for every reset, in order.
        losses: ``{"flow": [...], "prior": [...]}``, one mean per step: the flow's loss in nats
            per dimension, the prior's denoising loss.

    Raises:
        TypeError: If ``flow`` is not a :class:`~cleanprior.nn.flow.ConditionalFlow`, or a trained
            prior is not a ``PreconditionedDenoiser``.
        ValueError: If the flow is not conditioned as :func:`condition` does, or the prior cannot
            be trained or reset as configured.
    """

    def __init__(self, flow: ConditionalFlow, prior: PreconditionedDenoiser | Denoiser,
                 config: FlowDiffConfig | None = None) -> None:
        self.config = config or FlowDiffConfig()
        if not isinstance(flow, ConditionalFlow):
            raise TypeError(f"flow must be a ConditionalFlow, got {type(flow).__name__}")
        if flow.cond_channels != 2 * flow.shape[0]:
            raise ValueError(f"the flow takes {flow.cond_channels} condition channels, but condition() gives "
                             f"2 x {flow.shape[0]} for signals of shape {flow.shape}")
        self.trains_prior = self.config.prior_steps_per_flow_step > 0
        trainable = isinstance(prior, nn.Module) and any(p.requires_grad for p in prior.parameters())
        if self.trains_prior and not trainable:
            raise ValueError("a prior trained by FlowDiff must be a module with trainable parameters; "
                             "set prior_steps_per_flow_step=0 for a fixed prior")
        if not self.trains_prior and self.config.reset_prior_every:
            raise ValueError("reset_prior_every needs a trained prior (prior_steps_per_flow_step > 0)")
        if self.trains_prior and not isinstance(prior, PreconditionedDenoiser):
            raise TypeError(f"the trained prior must be a PreconditionedDenoiser (dsm_loss weighs by its sigma_data), "
                            f"got {type(prior).__name__}")
        if self.config.reset_prior_every and getattr(prior.network, "config", None) is None:
            raise ValueError(f"resetting the prior rebuilds its network from `network.config`, which "
                             f"{type(prior.network).__name__} lacks")
        self.flow = flow
        self.prior = prior
        self.ema: PreconditionedDenoiser | None = (
            copy.deepcopy(prior).eval().requires_grad_(False) if self.trains_prior else None)
        # the optimisers live in the one training loop; their states are kept between runs here
        self.optimizers: dict[str, dict[str, Any] | None] = {"flow": None, "prior": None}
        self._noise_law = TrainConfig(noise="lognormal", p_mean=self.config.p_mean, p_std=self.config.p_std,
                                      progress=False)
        self.step = 0
        self.resets: list[tuple[int, str]] = []
        self.losses: dict[str, list[float]] = {"flow": [], "prior": []}

    @property
    def device(self) -> torch.device:
        """The device of the flow (and of training)."""
        return next(self.flow.parameters()).device

    @property
    def denoiser(self) -> Denoiser:
        """The learned prior for sampling: the EMA denoiser (the fixed prior when not trained)."""
        return self.ema if self.ema is not None else self.prior

    def _fresh_seed(self, purpose: int) -> int:
        return int(torch.randint(2**62, (), generator=round_generator(self.config.seed, purpose, self.step)))

    def reset_flow(self) -> None:
        """Re-initialise the flow to fresh weights (drawn from the seed and the step) and a fresh optimiser."""
        # The constructor initialises from torch's global generator: fork it, so that the fresh
        # weights depend on the run's seed alone and the caller's generator state is untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self._fresh_seed(_FLOW_RESET))
            fresh = type(self.flow)(**self.flow.config)
        self.flow.load_state_dict(fresh.state_dict())
        self.optimizers["flow"] = None
        self.resets.append((self.step, "flow"))

    def reset_prior(self) -> None:
        """Re-initialise the prior and its EMA to fresh weights, with a fresh optimiser.

        Raises:
            ValueError: For a fixed prior.
        """
        if not self.trains_prior:
            raise ValueError("a fixed prior (prior_steps_per_flow_step=0) is not reset")
        network = self.prior.network
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self._fresh_seed(_PRIOR_RESET))
            fresh = type(network)(**network.config).state_dict()
        self.prior.network.load_state_dict(fresh)
        self.ema.network.load_state_dict(fresh)
        self.optimizers["prior"] = None
        self.resets.append((self.step, "prior"))

    def _check(self, observations: Observations) -> Observations:
        if not isinstance(observations, Observations):
            raise TypeError(f"observations must be an Observations, got {type(observations).__name__}")
        if tuple(observations.shape) != self.flow.shape:
            raise ValueError(f"the observations' signals have shape {observations.shape}, the flow's {self.flow.shape}")
        if not observations.operator.linear:
            raise TypeError(f"FlowDiff needs a linear operator (it conditions on A^T y), got "
                            f"{observations.operator._label()!r}")
        if observations.noise != "gaussian":
            raise ValueError(f"FlowDiff's likelihood is Gaussian, the observations' noise is {observations.noise!r}")
        _noise_std(observations.noise_std, len(observations), observations.y)
        if observations.y.device != self.device:
            observations = observations.to(self.device)
        with torch.no_grad():
            zero = torch.zeros((1, *self.flow.shape), device=self.device)
            probe = self.prior(zero, torch.ones(1, device=self.device))
        if tuple(probe.shape[1:]) != self.flow.shape:
            raise ValueError(f"the prior maps a signal of shape {self.flow.shape} to {tuple(probe.shape[1:])}")
        return observations

    def _minibatch(self, observations: Observations, generator: torch.Generator) -> tuple[Observations, Tensor]:
        index = torch.randint(len(observations), (self.config.batch_size,), generator=generator)
        batch = observations.subset(index)
        return batch, condition(batch.operator, batch.y, self.flow.shape)

    def _flow_loss(self, observations: Observations) -> Tensor:
        """The flow's loss at the current step, in nats per dimension (a scalar)."""
        config = self.config
        batch, c = self._minibatch(observations, round_generator(config.seed, _FLOW_BATCH, self.step))
        draws = round_generator(config.seed, _FLOW_DRAWS, self.step, device=self.device)
        if isinstance(self.prior, nn.Module):
            self.prior.eval()
        loss = flowdiff_loss(self.flow, self.prior, batch.operator, batch.y, batch.noise_std, c,
                             levels=config.bound_levels, sigma_min=config.sigma_min, sigma_max=config.sigma_max,
                             path_gradient=config.path_gradient, generator=draws)
        # per dimension, so that the clipping threshold means the same at every image size
        return loss.mean() / self.flow.features

    def _prior_loss(self, observations: Observations, repeat: int) -> Tensor:
        """The prior's denoising loss on fresh flow samples at the current step (a scalar)."""
        config = self.config
        picks = round_generator(config.seed, _PRIOR_BATCH, self.step, repeat)
        _, c = self._minibatch(observations, picks)
        draws = round_generator(config.seed, _PRIOR_DRAWS, self.step, repeat, device=self.device)
        with torch.no_grad():
            x, _ = self.flow.sample(c, draws)
        sigma = sample_sigma(self._noise_law, config.batch_size, picks).to(self.device, x.dtype)
        return dsm_loss(self.prior, x, sigma, generator=draws).mean()

    def run(
        self,
        observations: Observations,
        steps_to: int | None = None,
        *,
        progress: bool = False,
        save: Callable[[], None] | None = None,
        checkpoint_every: int | None = None,
    ) -> None:
        """Train until the step counter reaches ``steps_to``.

        Before step :math:`s` the flow is reset when ``reset_flow_every`` divides :math:`s > 0`,
        and likewise the prior.

        Arguments:
            observations: The observations to learn from (moved to the flow's device).
            steps_to: The step to stop at (``config.steps`` when omitted); at or below the current
                step, nothing is done.
            progress: Show a progress bar with the losses.
            save: Called every ``checkpoint_every`` steps and at the end, with this object's state
                (:meth:`state_dict`) at that step and its losses read finite (a checkpoint).
            checkpoint_every: Steps between calls of ``save`` (only at the end when omitted).

        Raises:
            TypeError: If the observations' operator is not linear.
            ValueError: If the observations do not fit the flow and the prior, or their noise is
                not Gaussian with a positive level.
            FloatingPointError: If a loss or the weights become non-finite (found at the training
                loop's reads; ``save`` is not called after it).
        """
        steps_to = self.config.steps if steps_to is None else steps_to
        if isinstance(steps_to, bool) or not isinstance(steps_to, int) or steps_to < 0:
            raise ValueError(f"steps_to must be a non-negative integer, got {steps_to!r}")
        if steps_to <= self.step:
            return
        observations = self._check(observations)
        config = self.config
        updates = [Update("flow", self.flow, lambda step, repeat: self._flow_loss(observations), config.flow_lr,
                          clip=config.clip)]
        if self.trains_prior:
            updates.append(Update("prior", self.prior, lambda step, repeat: self._prior_loss(observations, repeat),
                                  config.prior_lr, clip=config.clip, ema=self.ema, ema_decay=config.ema_decay,
                                  repeats=config.prior_steps_per_flow_step))

        def before_step(step: int) -> list[str]:
            self.step = step
            fresh = []
            if config.reset_flow_every and step > 0 and step % config.reset_flow_every == 0:
                self.reset_flow()
                fresh.append("flow")
            if config.reset_prior_every and step > 0 and step % config.reset_prior_every == 0:
                self.reset_prior()
                fresh.append("prior")
            return fresh

        def absorb(state: dict[str, Any]) -> None:
            self.step = state["step"]
            self.optimizers = {name: state["optimizers"].get(name) for name in ("flow", "prior")}
            flow = state["history"]["flow"]
            self.losses = {"flow": flow, "prior": state["history"].get("prior", [math.nan] * len(flow))}

        def checkpoint(state: dict[str, Any]) -> None:
            absorb(state)
            if save is not None:
                save()

        history = {"flow": self.losses["flow"], **({"prior": self.losses["prior"]} if self.trains_prior else {})}
        trained = optimize(
            updates, steps=config.steps, generator=None, until=steps_to,
            log_every=min(50, checkpoint_every or 50), checkpoint_every=checkpoint_every or config.steps + 1,
            state={"step": self.step, "history": history, "optimizers": dict(self.optimizers)},
            save=checkpoint, before_step=before_step, progress=progress, desc="flowdiff",
        )
        absorb(trained.state)
        if isinstance(self.prior, nn.Module):
            self.prior.eval()

    @torch.no_grad()
    def amortized(
        self,
        A: Operator | Any,
        y: Tensor,
        *,
        samples: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        r"""Posterior samples :math:`x \sim q_\phi(x \mid y)` from one pass of the flow.

        Arguments:
            A: The linear forward model of the ``B`` observations.
            y: Observations, shape ``(B, *y_shape)``.
            samples: None for one sample per observation; an integer :math:`S \geq 1` for ``S``.
            generator: The source of the flow's base samples (on the flow's device).

        Returns:
            Shape ``(B, *shape)``, or ``(B, S, *shape)`` with ``samples``.

        Raises:
            ValueError: If ``samples`` is not a positive integer or ``y`` does not fit ``A``.
        """
        if samples is not None and (isinstance(samples, bool) or not isinstance(samples, int) or samples < 1):
            raise ValueError(f"samples must be None or a positive integer, got {samples!r}")
        c = condition(A, y, self.flow.shape)
        if samples is None:
            return self.flow.sample(c, generator)[0]
        x, _ = self.flow.sample(c.repeat_interleave(samples, 0), generator)
        return x.reshape(y.shape[0], samples, *self.flow.shape)

    def state_dict(self) -> dict[str, Any]:
        """Everything that resumes training exactly: weights, optimisers, EMA, step, resets, losses.

        Returns:
            Plain types and tensors (``torch.save``-able with ``weights_only`` loading); like
            ``Module.state_dict``, the tensors are the live ones: save or copy the state before
            training on.
        """
        state: dict[str, Any] = {
            "config": dataclasses.asdict(self.config),
            "flow_config": dict(self.flow.config),
            "step": self.step,
            "resets": [list(reset) for reset in self.resets],
            "losses": {k: list(v) for k, v in self.losses.items()},
            "flow": self.flow.state_dict(),
            "flow_optimizer": self.optimizers["flow"],
        }
        if self.trains_prior:
            state.update(prior=self.prior.state_dict(), ema=self.ema.state_dict(),
                         prior_optimizer=self.optimizers["prior"])
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`.

        Arguments:
            state: A state of a run with the same options (``steps`` may differ) and flow.

        Raises:
            ValueError: If the state's options or flow differ from this run's.
        """
        mine = dataclasses.asdict(self.config)
        differ = sorted(k for k in mine if k != "steps" and state["config"].get(k) != mine[k])
        if differ:
            raise ValueError(f"the state was saved with other options: {', '.join(differ)}")
        if state["flow_config"] != self.flow.config:
            raise ValueError(f"the state's flow {state['flow_config']} differs from this run's {self.flow.config}")
        self.flow.load_state_dict(state["flow"])
        self.optimizers = {"flow": state["flow_optimizer"], "prior": None}
        if self.trains_prior:
            self.prior.load_state_dict(state["prior"])
            self.ema.load_state_dict(state["ema"])
            self.optimizers["prior"] = state["prior_optimizer"]
        self.step = int(state["step"])
        self.resets = [(int(step), str(kind)) for step, kind in state["resets"]]
        self.losses = {k: list(v) for k, v in state["losses"].items()}


class FlowDiffMethod:
    """FlowDiff's training cut into rounds (a :class:`~cleanprior.learning.rounds.Method`).

    Round ``k`` trains until step ``k x training.steps`` (a step: one flow step and the prior's
    steps); the state (flow, prior, EMA, optimisers) is saved in ``RUN/flowdiff.pt`` every
    ``training.checkpoint_every`` steps and at the end of the round, and each round's own copy in
    ``RUN/rounds/KK/flowdiff.pt``; the prior (EMA) goes to ``RUN/checkpoint.pt`` like every
    method's. Besides the prior's metrics, each round measures the flow's one-pass posterior on
    the held-out observations (``amortized_psnr``, ``amortized_ssim``: the mean of
    ``evaluation.posterior_samples`` flow samples).

    Arguments:
        config: The joint training's options (its ``steps`` and ``seed`` come from the run:
            ``rounds x training.steps`` and the run's seed).
    """

    name = "flowdiff"
    start_label = ""

    def __init__(self, config: FlowDiffConfig | None = None) -> None:
        self.config = config or FlowDiffConfig()
        self.model: FlowDiff | None = None

    def check(self, observations: Any, config: Any) -> None:
        if not getattr(observations.operator, "linear", False):
            raise ValueError(f"flowdiff conditions its flow on A^T y: the operator {observations.operator.name!r} "
                             "must be linear")
        noise_std = torch.as_tensor(observations.noise_std)
        if not bool((noise_std > 0).all()):
            raise ValueError("flowdiff's data term needs a positive noise level for every observation")
        shape = tuple(observations.shape)
        if len(shape) == 3 and (shape[1] % 2 or shape[2] % 2):
            raise ValueError(f"the flow squeezes images 2 x 2: height and width must be even, got {shape}")

    def settings(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self.config).items() if k not in ("steps", "seed")}

    def start(self, context: Any) -> None:
        return None

    def _build(self, context: Any) -> FlowDiff:
        from cleanprior.runs.prior import default_network

        config = dataclasses.replace(self.config, seed=context.config.seed,
                                     steps=context.config.rounds * context.training.steps)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(2**62, (), generator=round_generator(context.config.seed, 8))))
            prior = default_network(context.shape, context.network)
            flow = make_flow(context.shape, config)
        return FlowDiff(flow.to(context.device), prior.to(context.device), config)

    def _load(self, context: Any, path: Any) -> FlowDiff:
        from cleanprior.runs.checkpoint import load_checkpoint

        model = self._build(context)
        if path.exists():
            model.load_state_dict(load_checkpoint(path, map_location=context.device, keys=("flow", "step")))
        self.model = model
        return model

    def _save(self, context: Any, path: Any) -> None:
        from cleanprior.runs.checkpoint import save_checkpoint

        if distributed.is_main():
            save_checkpoint(path, copy.deepcopy(self.model.state_dict()))

    def round(self, context: Any, k: int, prior: Any) -> tuple[Any, dict[str, Any]]:
        from cleanprior.runs.checkpoint import save_denoiser

        model = self._load(context, context.run / "flowdiff.pt")
        model.run(context.data, steps_to=k * context.training.steps, progress=context.progress and distributed.is_main(),
                  save=lambda: self._save(context, context.run / "flowdiff.pt"),
                  checkpoint_every=context.training.checkpoint_every)
        context.folder(k).mkdir(parents=True, exist_ok=True)
        self._save(context, context.folder(k) / "flowdiff.pt")
        if distributed.is_main():
            save_denoiser(context.run / "checkpoint.pt", model.denoiser, metadata={
                "trained_on": context.description, "shape": list(context.shape), "method": self.name, "round": k,
                "network": dataclasses.asdict(context.network)})
        tail = model.losses["flow"][-50:]
        return model.denoiser, {"loss": sum(tail) / max(1, len(tail))}

    def restore(self, context: Any, k: int) -> Any:
        return self._load(context, context.folder(k) / "flowdiff.pt").denoiser

    def evaluate(self, context: Any, k: int, prior: Any) -> dict[str, Any]:
        heldout = context.heldout
        if heldout is None or heldout.x is None or self.model is None:
            return {}
        generator = round_generator(context.config.seed, 12, device=context.device)
        x = self.model.amortized(heldout.operator, heldout.y, samples=context.evaluation.posterior_samples,
                                 generator=generator).mean(1).cpu()
        truth = heldout.x.detach().cpu()
        if x.ndim != 4:
            return {"amortized_rmse": float(((x - truth) ** 2).mean().sqrt())}
        from cleanprior.metrics.image import psnr, ssim

        side = min(x.shape[-2:])
        window = min(11, side if side % 2 else side - 1)
        return {"amortized_psnr": float(psnr(x, truth).mean()), "amortized_ssim": float(ssim(x, truth, window=window).mean())}
