r"""AmbientDiffusion: diffusion priors learned from masked or noisy data, without EM.

**Masked data** (Daras et al. 2023). Each training item is observed through a binary mask,
:math:`y = M \odot x` (stored in image space, erased entries at 0). Every step corrupts it
further, :math:`\tilde M = M \odot B` with :math:`B_j \sim \text{Bernoulli}(1 - \delta)`
independent per entry, and the network sees only :math:`\tilde M \odot x_t`,
:math:`x_t = y + \sigma \epsilon`, and :math:`\tilde M`. Its loss is on the entries :math:`M`
originally observed,

.. math::
    \ell = w(\sigma)\, \frac{\| M \odot (D(\tilde M \odot x_t, \sigma, \tilde M) - y) \|^2}
        {\|M\|_1},
    \qquad w(\sigma) = \frac{1}{\sigma^2} + \frac{1}{\sigma_d^2}.

The network cannot tell an entry that :math:`B` erased (and the loss checks) from one that
:math:`M` erased (and the loss ignores), so when the masks are independent of the data, the
minimiser is :math:`D = E[x \mid \tilde M \odot x_t, \tilde M]` on every
entry, the erased ones included: the conditional expectation of the *clean* image. The
denoiser is a :class:`~cleanprior.diffusion.precondition.PreconditionedDenoiser` around a
mask-conditioned network (:mod:`cleanprior.nn.masked`), evaluated with the mask by
:func:`masked_denoise`; :class:`FixedMaskDenoiser` (one mask per trajectory, the paper's sampler)
and :class:`AmbientDenoiser` (fresh masks at every call) turn it into a plain denoiser for the
samplers.

**Noisy data** (Daras et al. 2024). Items observed as :math:`y = x + \sigma_y n`. For a level
:math:`\sigma > \sigma_y`, :math:`x_t = y + \sqrt{\sigma^2 - \sigma_y^2}\, \epsilon` has the law
of :math:`x + \sigma \epsilon`, and a network regressing :math:`y` from :math:`x_t` learns
:math:`E[y \mid x_t]`. Tweedie's formula applied to both :math:`x` and :math:`y` converts it
exactly,

.. math::
    E[x \mid x_t] = x_t + \frac{\sigma^2}{\sigma^2 - \sigma_y^2}\big(E[y \mid x_t] - x_t\big),

(:class:`AmbientNoisyLoss` trains, :class:`AmbientNoisyDenoiser` converts). Levels at or below
:math:`\sigma_y` cannot be learned this way; the paper's consistency loss, which would reach
them, is not implemented.

References:
    Daras, Shah, Dagan, Gollakota, Dimakis & Klivans (2023). Ambient Diffusion: Learning Clean
    Distributions from Corrupted Data. https://arxiv.org/abs/2305.19256
    Daras, Dimakis & Daskalakis (2024). Consistent Diffusion Meets Tweedie: Training Exact
    Ambient Diffusion Models with Noisy Data. https://arxiv.org/abs/2404.10177
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from cleanprior.diffusion.denoiser import Denoiser, batch_sigma, expand_sigma
from cleanprior.diffusion.precondition import PreconditionedDenoiser
from cleanprior.diffusion.training import dsm_weight

__all__ = [
    "AmbientDenoiser",
    "AmbientLoss",
    "AmbientNoisyDenoiser",
    "AmbientNoisyLoss",
    "FixedMaskDenoiser",
    "masked_denoise",
]

# The lowest level of the noisy-data conversion, relative to the data's noise (see
# AmbientNoisyDenoiser): close to it, where the conversion is still finite.
DEFAULT_FLOOR = 1.1


def _check_mask_conditioned(denoiser: PreconditionedDenoiser) -> None:
    """Raise a TypeError unless ``denoiser`` wraps a mask-conditioned network."""
    network = getattr(denoiser, "network", None)
    if not getattr(network, "mask_conditioned", False):
        raise TypeError(
            f"the denoiser's network ({type(network).__name__}) does not take a mask: wrap a "
            "cleanprior.nn.MaskedUNet or MaskedMLP in a PreconditionedDenoiser"
        )


def masked_denoise(
    denoiser: PreconditionedDenoiser, x_t: Tensor, sigma: Tensor | float, mask: Tensor
) -> Tensor:
    r"""The preconditioned denoiser evaluated on the kept entries only.

    .. math::
        D(x_t, \sigma, M) = c_{\text{skip}}(\sigma)\, M \odot x_t + c_{\text{out}}(\sigma)\,
            F\big(c_{\text{in}}(\sigma)\, M \odot x_t,\; c_{\text{noise}}(\sigma),\; M\big),

    the EDM preconditioning of :class:`~cleanprior.diffusion.precondition.PreconditionedDenoiser`
    with the mask passed to its network; an erased entry's estimate comes from the network alone.
    With :math:`M = 1` this is ``denoiser(x_t, sigma)``.

    Arguments:
        denoiser: A preconditioned denoiser whose network is mask-conditioned
            (:class:`~cleanprior.nn.masked.MaskedUNet` or :class:`~cleanprior.nn.masked.MaskedMLP`).
        x_t: Noisy samples, shape ``(B, *shape)``; erased entries are ignored.
        sigma: Noise levels, broadcastable to ``(B,)``; positive.
        mask: Kept (1) and erased (0) entries, shape ``(B, *shape)`` (or what the network
            broadcasts, e.g. ``(B, 1, H, W)`` for images).

    Returns:
        The estimate of :math:`E[x \mid M \odot x_t, M]`, shape ``(B, *shape)``.

    Raises:
        TypeError: If the denoiser's network does not take a mask.
    """
    _check_mask_conditioned(denoiser)
    sigma = batch_sigma(sigma, x_t)
    c_skip, c_out, c_in, c_noise = denoiser.coefficients(sigma)
    view = (-1,) + (1,) * (x_t.ndim - 1)
    kept = mask.to(x_t.dtype) * x_t
    f = denoiser.network(c_in.reshape(view) * kept, c_noise, mask=mask)
    return c_skip.reshape(view) * kept + c_out.reshape(view) * f.to(x_t.dtype)


def _check_binary(masks: Tensor, name: str) -> None:
    """Raise a ValueError unless every entry of ``masks`` is 0 or 1."""
    if masks.dtype != torch.bool and not ((masks == 0) | (masks == 1)).all():
        raise ValueError(f"{name} must hold only 0 and 1 (kept and erased entries)")


class AmbientLoss:
    r"""AmbientDiffusion's training loss for masked data.

    A :class:`~cleanprior.diffusion.training.TrainingLoss` for
    :func:`~cleanprior.diffusion.training.train`.

    With the minibatch's masks :math:`M` (picked by ``index``) and a further corruption
    :math:`B_j \sim \text{Bernoulli}(1 - \delta)` drawn from the step's generator,
    :math:`\tilde M = M \odot B`, :math:`x_t = y + \sigma \epsilon`,

    .. math::
        \ell = w(\sigma)\, \frac{\| M \odot (D(\tilde M \odot x_t, \sigma, \tilde M) - y) \|^2}
            {\|M\|_1},
        \qquad w(\sigma) = \frac{1}{\sigma^2} + \frac{1}{\sigma_d^2}

    (the weight of :func:`~cleanprior.diffusion.training.dsm_loss`, the squared error averaged
    over the originally observed entries; an item that observes nothing contributes 0). The data
    handed to :func:`~cleanprior.diffusion.training.train` are the masked observations
    :math:`y = M \odot x` in image space (:math:`A^\top y` of a mask operator).

    :math:`B` is drawn per entry, so for images with channel-shared masks it erases the channels
    of a pixel separately. The minimiser is still the clean conditional expectation on every
    entry: per entry it is :math:`E[M_j x_j \mid \cdot] / E[M_j \mid \cdot]`, which is
    :math:`E[x_j \mid \tilde M \odot x_t, \tilde M]` as soon as the masks are independent of
    the data and every entry may have been observed whatever :math:`\tilde M` is.

    Arguments:
        masks: The observation masks, shape ``(N, *shape)``, one per training item (row ``i``
            of the data), 1 where observed and 0 where missing.
        delta: The probability :math:`\delta \in (0, 1)` that the further corruption erases an
            observed entry. Larger values show the network more erased entries to infer and
            fewer observed ones to condition on.

    Raises:
        ValueError: If ``masks`` is not a batch of binary masks or ``delta`` is outside (0, 1).

    References:
        Daras et al. (2023). Ambient Diffusion: Learning Clean Distributions from Corrupted
        Data. https://arxiv.org/abs/2305.19256
    """

    def __init__(self, masks: Tensor, delta: float = 0.1) -> None:
        if masks.ndim < 2 or masks.shape[0] == 0:
            raise ValueError(
                f"masks must have shape (N, *shape) with N > 0, got {tuple(masks.shape)}"
            )
        _check_binary(masks, "masks")
        if not 0 < delta < 1:
            raise ValueError(f"delta must lie in (0, 1), got {delta}")
        # One byte per entry: the masks can be as large as the data set.
        self.masks = masks.detach().to("cpu", torch.bool)
        self.delta = float(delta)

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
            denoiser: The preconditioned denoiser being trained, around a mask-conditioned
                network.
            x: The masked observations :math:`y = M \odot x`, shape ``(B, *shape)``.
            sigma: Noise levels, shape ``(B,)``.
            noise: Standard normal noise, shape ``(B, *shape)``.
            index: The rows' indices into the training data (and into ``masks``), shape ``(B,)``.
            generator: The source of the further corruption :math:`B` (on the device of ``x``).

        Returns:
            The per-sample loss, shape ``(B,)``.

        Raises:
            ValueError: If ``x`` does not match the masks' shape or ``index`` falls outside
                them.
            TypeError: If the denoiser's network does not take a mask.
        """
        if tuple(x.shape[1:]) != tuple(self.masks.shape[1:]):
            raise ValueError(
                f"the data's items have shape {tuple(x.shape[1:])} but the masks have shape "
                f"{tuple(self.masks.shape[1:])}"
            )
        if index.shape != (x.shape[0],):
            raise ValueError(f"index must have shape ({x.shape[0]},), got {tuple(index.shape)}")
        if index.numel() and not (0 <= int(index.min()) and int(index.max()) < self.masks.shape[0]):
            raise ValueError(
                f"index must lie in [0, {self.masks.shape[0]}): the masks are one per training item"
            )
        _check_mask_conditioned(denoiser)
        observed = self.masks[index.cpu()].to(x.device, x.dtype)
        keep = torch.rand(x.shape, generator=generator, device=x.device) >= self.delta
        further = observed * keep.to(x.dtype)
        x_t = x + expand_sigma(sigma, x) * noise
        error = observed * (masked_denoise(denoiser, x_t, sigma, further) - x)
        count = observed.flatten(1).sum(1).clamp_min(1)
        weight = dsm_weight(sigma, denoiser.sigma_data)
        return weight * error.float().pow(2).flatten(1).sum(1) / count


class AmbientDenoiser(nn.Module):
    r"""A plain denoiser :math:`(x_t, \sigma) \mapsto E[x \mid x_t]` from an AmbientDiffusion model.

    At sampling time the whole image is "observed" (:math:`M = 1`), so each call draws a fresh
    further-corruption mask of the training law, :math:`\tilde M_j \sim \text{Bernoulli}(1 -
    \delta)` for every entry, and returns the average over ``draws`` such masks,

    .. math::
        D(x_t, \sigma) = \frac{1}{K} \sum_{k=1}^{K}
            D_\theta(\tilde M_k \odot x_t, \sigma, \tilde M_k).

    Each term estimates :math:`E[x \mid \tilde M_k \odot x_t, \tilde M_k]`, which conditions
    on less than :math:`x_t` (a fraction :math:`\delta` of the entries is hidden), so the
    estimate is smoother than :math:`E[x \mid x_t]`; averaging over masks lowers its variance,
    not that bias. Alternatives: AmbientDiffusion's *fixed-mask* sampler keeps one
    :math:`\tilde M` for a whole trajectory (:class:`FixedMaskDenoiser`); drawing
    :math:`\tilde M` with the density of the training masks :math:`M \odot B` (kept fraction
    :math:`(1 - p)(1 - \delta)` for i.i.d. masks that miss a fraction :math:`p`) matches what
    the network saw in training and is obtained here with ``delta = 1 - (1 - p)(1 - delta)``.

    Arguments:
        denoiser: A preconditioned denoiser around a mask-conditioned network.
        delta: The probability that the fresh mask erases an entry, in (0, 1) (the training
            :math:`\delta`).
        generator: The source of the masks, on the device of the samples (the default
            generator when ``None``).
        draws: The number :math:`K \geq 1` of masks averaged per call.

    Raises:
        ValueError: If ``delta`` is outside (0, 1) or ``draws`` is not positive.
        TypeError: If the denoiser's network does not take a mask.

    References:
        Daras et al. (2023). Ambient Diffusion: Learning Clean Distributions from Corrupted
        Data (sampling). https://arxiv.org/abs/2305.19256
    """

    def __init__(
        self,
        denoiser: PreconditionedDenoiser,
        delta: float,
        generator: torch.Generator | None = None,
        draws: int = 1,
    ) -> None:
        super().__init__()
        if not 0 < delta < 1:
            raise ValueError(f"delta must lie in (0, 1), got {delta}")
        if draws < 1:
            raise ValueError(f"draws must be positive, got {draws}")
        _check_mask_conditioned(denoiser)
        self.denoiser = denoiser
        self.delta = float(delta)
        self.generator = generator
        self.draws = int(draws)

    def forward(self, x_t: Tensor, sigma: Tensor | float) -> Tensor:
        r"""Estimate :math:`E[x \mid x_t]` through fresh further-corruption masks.

        Arguments:
            x_t: Noisy samples, shape ``(B, *shape)``.
            sigma: Noise levels, broadcastable to ``(B,)``.

        Returns:
            The estimate, shape ``(B, *shape)``.
        """
        sigma = batch_sigma(sigma, x_t)
        total = torch.zeros_like(x_t)
        for _ in range(self.draws):
            keep = torch.rand(x_t.shape, generator=self.generator, device=x_t.device) >= self.delta
            total = total + masked_denoise(self.denoiser, x_t, sigma, keep.to(x_t.dtype))
        return total / self.draws


class FixedMaskDenoiser(nn.Module):
    r"""AmbientDiffusion's fixed-mask sampler: each trajectory keeps one mask throughout.

    Row :math:`i` of every batch is denoised through the same mask :math:`\tilde M_i` at every
    call, so that a sampler, which calls the denoiser once or twice per step on the same rows,
    follows one mask from the first step to the last:

    .. math:: D(x_t, \sigma)_i = D_\theta(\tilde M_i \odot x_{t,i}, \sigma, \tilde M_i),
              \qquad \tilde M_{ij} \sim \text{Bernoulli}(\text{keep}).

    Each row's estimate is then :math:`E[x \mid \tilde M_i \odot x_t, \tilde M_i]`, a
    denoiser the network was trained to be (with a mask as sparse as the training masks, or
    denser), and the trajectory is that of a prior whose hidden entries the network fills in
    coherently. Unlike :class:`AmbientDenoiser`, whose masks change at every call, this is a
    deterministic function of the row index: the masks are drawn from ``seed`` for each batch
    size and reused.

    Arguments:
        denoiser: A preconditioned denoiser around a mask-conditioned network.
        keep: The fraction of entries each mask keeps, in (0, 1]; 1 shows every entry.
        seed: The seed of the masks.

    Raises:
        ValueError: If ``keep`` is outside (0, 1].
        TypeError: If the denoiser's network does not take a mask.

    References:
        Daras et al. (2023). Ambient Diffusion: Learning Clean Distributions from Corrupted
        Data (the fixed-mask sampler). https://arxiv.org/abs/2305.19256
    """

    def __init__(self, denoiser: PreconditionedDenoiser, keep: float, seed: int = 0) -> None:
        super().__init__()
        if not 0 < keep <= 1:
            raise ValueError(f"keep must lie in (0, 1], got {keep}")
        _check_mask_conditioned(denoiser)
        self.denoiser = denoiser
        self.keep = float(keep)
        self.seed = int(seed)
        self._masks: dict[tuple[tuple[int, ...], str, torch.dtype], Tensor] = {}

    def masks(self, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> Tensor:
        """The masks of a batch of ``shape`` ``(B, *shape)``: 1 kept, 0 hidden, drawn on the CPU."""
        key = (tuple(shape), str(device), dtype)
        if key not in self._masks:
            generator = torch.Generator().manual_seed(self.seed)
            kept = torch.rand(shape, generator=generator) < self.keep
            self._masks[key] = kept.to(device=device, dtype=dtype)
        return self._masks[key]

    def forward(self, x_t: Tensor, sigma: Tensor | float) -> Tensor:
        r"""Denoise each row through its own fixed mask.

        Arguments:
            x_t: Noisy samples, shape ``(B, *shape)``.
            sigma: Noise levels, broadcastable to ``(B,)``.

        Returns:
            The estimate, shape ``(B, *shape)``.
        """
        return masked_denoise(
            self.denoiser, x_t, batch_sigma(sigma, x_t), self.masks(x_t.shape, x_t.device, x_t.dtype)
        )


def _check_noise_std(noise_std: float) -> float:
    """``noise_std`` as a float, or a ValueError unless it is positive and finite."""
    value = float(noise_std)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"noise_std must be positive and finite, got {noise_std}")
    return value


class AmbientNoisyLoss:
    r"""Ambient training from noisy data :math:`y = x + \sigma_y n`.

    A :class:`~cleanprior.diffusion.training.TrainingLoss` for
    :func:`~cleanprior.diffusion.training.train`.

    A drawn level :math:`s` (from the configured law, which knows nothing of :math:`\sigma_y`)
    is mapped to the total level :math:`\sigma = \sqrt{\sigma_y^2 + s^2} > \sigma_y`, so that
    the noise to add is exactly :math:`\sqrt{\sigma^2 - \sigma_y^2} = s`:
    :math:`x_t = y + s \epsilon` has the law of :math:`x + \sigma \epsilon`. The denoiser,
    called at the total level :math:`\sigma` (the clean-space level a sampler will ask for),
    regresses :math:`y`,

    .. math::
        \ell = w(\sigma)\, \tfrac{1}{n} \| h(x_t, \sigma) - y \|^2, \qquad
        w(\sigma) = \frac{1}{\sigma^2} + \frac{1}{\sigma_d^2},

    whose minimiser is :math:`h = E[y \mid x_t]`; :class:`AmbientNoisyDenoiser` converts it to
    :math:`E[x \mid x_t]`. The mapping keeps every drawn level (resampling until
    :math:`s > \sigma_y` would waste draws and distort the law); the levels drawn far below
    :math:`\sigma_y` all land just above it. Conditioning the network on the added level :math:`s`
    instead would make this plain denoising score matching on :math:`y`; the total level keeps
    the trained network's level argument the same as the clean denoiser's.

    Arguments:
        noise_std: :math:`\sigma_y`, the standard deviation of the data's Gaussian noise, shared
            by all items; positive.

    Raises:
        ValueError: If ``noise_std`` is not positive and finite.

    References:
        Daras et al. (2024). Consistent Diffusion Meets Tweedie: Training Exact Ambient
        Diffusion Models with Noisy Data. https://arxiv.org/abs/2404.10177
    """

    def __init__(self, noise_std: float) -> None:
        self.noise_std = _check_noise_std(noise_std)

    def levels(self, sigma: Tensor) -> Tensor:
        r"""The total level :math:`\sqrt{\sigma_y^2 + s^2}` of each drawn level :math:`s`.

        Arguments:
            sigma: Drawn levels :math:`s`, any shape.

        Returns:
            The total levels, shape of ``sigma``.
        """
        return torch.sqrt(self.noise_std**2 + sigma**2)

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
            denoiser: The denoiser being trained (it learns :math:`E[y \mid x_t]`).
            x: Noisy observations :math:`y`, shape ``(B, *shape)``.
            sigma: Drawn levels :math:`s`, shape ``(B,)``.
            noise: Standard normal noise, shape ``(B, *shape)``.
            index: The rows' indices into the training data, shape ``(B,)`` (unused: the noise
                level is shared).
            generator: Unused (the loss draws nothing of its own).

        Returns:
            The per-sample loss, shape ``(B,)``.
        """
        total = self.levels(sigma)
        x_t = x + expand_sigma(sigma, x) * noise
        error = denoiser(x_t, total) - x
        weight = dsm_weight(total, denoiser.sigma_data)
        return weight * error.float().pow(2).flatten(1).mean(1)


class AmbientNoisyDenoiser(nn.Module):
    r"""The clean denoiser :math:`E[x \mid x_t]` from a network trained on noisy data.

    With :math:`h(x_t, \sigma) \approx E[y \mid x_t]` (trained by :class:`AmbientNoisyLoss`),
    and :math:`\bar\sigma = \max(\sigma, \sigma_f)`,

    .. math::
        D(x_t, \sigma) = x_t + \frac{\bar\sigma^2}{\bar\sigma^2 - \sigma_y^2}
            \big(h(x_t, \bar\sigma) - x_t\big),

    exact for :math:`\sigma \geq \sigma_f` when :math:`h` is. Below the floor :math:`\sigma_f`
    the estimate is the floor's: :math:`E[x \mid x_t]` as if :math:`x_t` carried noise
    :math:`\sigma_f` (a sampler then ends with Tweedie's estimate at :math:`\sigma_f`, slightly
    smoother than the truth). The floor must exceed :math:`\sigma_y`, where the ratio is
    singular: a network's error in :math:`h` is amplified by
    :math:`\sigma_f^2 / (\sigma_f^2 - \sigma_y^2)`, about 5.8 at the default
    :math:`\sigma_f = 1.1\, \sigma_y` (2 at :math:`\sqrt 2\, \sigma_y`). A floor closer to
    :math:`\sigma_y` smooths less and amplifies more; on a 4-dimensional Gaussian with an MLP the
    smoothing dominated (the error at levels below :math:`\sigma_y` grew steadily as the floor
    rose from :math:`1.05\, \sigma_y` to :math:`2 \sigma_y`), hence the default. The paper's
    consistency loss learns the levels below :math:`\sigma_y` instead (not implemented).

    Arguments:
        denoiser: :math:`h`, any callable ``(x_t, sigma) -> E[y | x_t]``.
        noise_std: :math:`\sigma_y`; positive.
        floor: :math:`\sigma_f > \sigma_y` (default :math:`1.1\, \sigma_y`).

    Raises:
        ValueError: If ``noise_std`` is not positive or ``floor`` does not exceed it.

    References:
        Daras et al. (2024). Consistent Diffusion Meets Tweedie: Training Exact Ambient
        Diffusion Models with Noisy Data. https://arxiv.org/abs/2404.10177
    """

    def __init__(self, denoiser: Denoiser, noise_std: float, floor: float | None = None) -> None:
        super().__init__()
        self.noise_std = _check_noise_std(noise_std)
        self.floor = DEFAULT_FLOOR * self.noise_std if floor is None else float(floor)
        if not self.floor > self.noise_std:
            raise ValueError(
                f"floor ({floor}) must exceed noise_std ({noise_std}), where the conversion "
                "is singular"
            )
        self.denoiser = denoiser

    def forward(self, x_t: Tensor, sigma: Tensor | float) -> Tensor:
        r"""Estimate :math:`E[x \mid x_t]`.

        Arguments:
            x_t: Noisy samples, shape ``(B, *shape)``.
            sigma: Noise levels, broadcastable to ``(B,)``.

        Returns:
            The estimate, shape ``(B, *shape)``.
        """
        level = batch_sigma(sigma, x_t).clamp_min(self.floor)
        gain = expand_sigma(level**2 / (level**2 - self.noise_std**2), x_t)
        return x_t + gain * (self.denoiser(x_t, level) - x_t)
