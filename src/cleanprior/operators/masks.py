r"""Pixel masks: :math:`y = m \odot x`, one mask per observation or one shared.

The observation keeps the signal's shape, with zeros where pixels are missing (as DiEM and
AmbientDiffusion store masked images). For a binary mask :math:`A = \operatorname{diag}(m)` is an
orthogonal projection, so :math:`A^\top = A^+ = A` and :math:`A^\top A = A`.

References:
    Rozet et al. (2024). DiEM, section 5.2 (corrupted CIFAR-10).
    Daras et al. (2023). Ambient Diffusion: Learning Clean Distributions from Corrupted Data.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from cleanprior.operators.base import LinearOperator, check_batch, check_finite
from cleanprior.operators.registry import register

__all__ = ["Identity", "Mask", "random_mask", "box_mask"]


@register("identity")
class Identity(LinearOperator):
    r"""The identity, :math:`y = x` (denoising problems)."""

    has_pinv = True

    def forward(self, x: Tensor) -> Tensor:
        return x

    def adjoint(self, y: Tensor) -> Tensor:
        return y

    def gram(self, x: Tensor) -> Tensor:
        return x

    def pinv(self, y: Tensor) -> Tensor:
        return y

    def parameters_dict(self) -> dict[str, Any]:
        return {"name": self.name}


@register("mask")
class Mask(LinearOperator):
    r"""Pixel-wise masking :math:`y = m \odot x`.

    Arguments:
        mask: Shape ``(1, *x_shape)`` (shared) or ``(B, *x_shape)`` (one per observation);
            binary (0 missing, 1 observed) or, more generally, non-negative weights. A mask of
            shape ``(B, 1, H, W)`` also covers images with several channels.
    """

    def __init__(self, mask: Tensor) -> None:
        super().__init__()
        mask = torch.as_tensor(mask)
        if mask.ndim < 2:
            raise ValueError(f"the parameter 'mask' must have shape (B, *x_shape), got {tuple(mask.shape)}")
        check_finite("mask", mask)
        if mask.is_complex() or (mask < 0).any():
            raise ValueError("the parameter 'mask' must be real and non-negative")
        if not mask.is_floating_point():
            mask = mask.float()
        self.register_buffer("mask", mask)
        # read once: samplers ask at every step, and reading the mask then would wait for the device
        self._binary = bool(((mask == 0) | (mask == 1)).all())

    @property
    def has_pinv(self) -> bool:  # type: ignore[override]
        return self._binary

    def _check(self, x: Tensor, what: str) -> None:
        check_batch("mask", self.mask, x.shape[0])
        try:
            torch.broadcast_shapes(self.mask.shape[1:], x.shape[1:])
        except RuntimeError:
            raise ValueError(f"the parameter 'mask' of shape {tuple(self.mask.shape[1:])} does not fit a {what} of shape {tuple(x.shape[1:])}") from None
        if torch.broadcast_shapes(self.mask.shape[1:], x.shape[1:]) != x.shape[1:]:
            raise ValueError(f"the parameter 'mask' of shape {tuple(self.mask.shape[1:])} does not fit a {what} of shape {tuple(x.shape[1:])}")

    def forward(self, x: Tensor) -> Tensor:
        self._check(x, "signal")
        return self.mask.to(x.real.dtype) * x

    def adjoint(self, y: Tensor) -> Tensor:
        self._check(y, "measurement")
        return self.mask.to(y.real.dtype) * y

    def gram(self, x: Tensor) -> Tensor:
        self._check(x, "signal")
        return self.mask.to(x.real.dtype) ** 2 * x

    def pinv(self, y: Tensor) -> Tensor:
        if not self.has_pinv:
            raise NotImplementedError("the pseudo-inverse of a weighted (non-binary) mask is not implemented")
        return self.adjoint(y)

    def parameters_dict(self) -> dict[str, Any]:
        return {"name": self.name, "mask": self.mask}


def random_mask(
    shape: Sequence[int],
    missing: float,
    *,
    batch: int = 1,
    shared_channels: bool = True,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    r"""Masks with a fraction ``missing`` of pixels removed uniformly at random.

    Arguments:
        shape: One signal's shape, e.g. ``(C, H, W)``.
        missing: The fraction of missing pixels, in [0, 1].
        batch: The number of masks.
        shared_channels: For images, drop a pixel in every channel at once.
        generator: The source of randomness.
        device: Where to put the masks.

    Returns:
        Binary masks, float32, shape ``(batch, *shape)`` (``(batch, 1, H, W)`` when channels are
        shared).
    """
    if not 0 <= missing <= 1:
        raise ValueError(f"missing must lie in [0, 1], got {missing}")
    shape = tuple(int(s) for s in shape)
    mask_shape = (1, *shape[1:]) if shared_channels and len(shape) == 3 else shape
    n = 1
    for s in mask_shape:
        n *= s
    scores = torch.rand(batch, n, generator=generator, device=device)
    drop = scores.argsort(dim=1)[:, : round(missing * n)]
    mask = torch.ones(batch, n, device=device).scatter_(1, drop, 0.0)
    return mask.reshape(batch, *mask_shape)


def box_mask(
    shape: Sequence[int],
    size: int | tuple[int, int],
    *,
    batch: int = 1,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    r"""Masks hiding one square (or rectangular) box per image at a random position.

    Arguments:
        shape: One image's shape ``(C, H, W)``.
        size: The box's side, or ``(height, width)``.
        batch: The number of masks.
        generator: The source of the positions.
        device: Where to put the masks.

    Returns:
        Binary masks, float32, shape ``(batch, 1, H, W)``.
    """
    if len(shape) != 3:
        raise ValueError(f"box masks are for images (C, H, W), got shape {tuple(shape)}")
    _, H, W = (int(s) for s in shape)
    h, w = (size, size) if isinstance(size, int) else size
    if not (0 < h <= H and 0 < w <= W):
        raise ValueError(f"the box {h}x{w} does not fit in an image of {H}x{W}")
    top = torch.randint(H - h + 1, (batch,), generator=generator, device=device)
    left = torch.randint(W - w + 1, (batch,), generator=generator, device=device)
    rows = torch.arange(H, device=device)[None, :, None]
    cols = torch.arange(W, device=device)[None, None, :]
    inside = (rows >= top[:, None, None]) & (rows < (top + h)[:, None, None]) & (cols >= left[:, None, None]) & (cols < (left + w)[:, None, None])
    return (~inside).float()[:, None]
