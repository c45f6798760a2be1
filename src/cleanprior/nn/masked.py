r"""Mask-conditioned networks :math:`F(x, c_{\text{noise}}, M)` for learning from masked data.

AmbientDiffusion trains a denoiser that only ever sees the entries a binary mask :math:`M`
keeps, and that knows which ones they are: the network reads the masked input and the mask
itself,

.. math:: F(x, c_{\text{noise}}, M) = G\big([M \odot x,\; M],\; c_{\text{noise}}\big),

with :math:`G` a U-Net with :math:`2C` input and :math:`C` output channels (images) or an MLP
from :math:`2d` to :math:`d` values (vectors). Masking inside the network guarantees that an
erased entry cannot leak into the estimate, whatever the caller passes there.

Both networks follow the registry's contract (``forward(x, c_noise)`` and a ``config`` that
rebuilds them), so a :class:`~cleanprior.diffusion.precondition.PreconditionedDenoiser` around
one saves and loads like any other; called without a mask they see every entry (:math:`M = 1`).
The class attribute ``mask_conditioned`` tells callers that ``forward`` takes ``mask=``.

References:
    Daras et al. (2023). Ambient Diffusion: Learning Clean Distributions from Corrupted Data.
    https://arxiv.org/abs/2305.19256
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from cleanprior.nn.mlp import MLP
from cleanprior.nn.unet import UNet

__all__ = ["MaskedMLP", "MaskedUNet"]


def _full_mask(mask: Tensor | None, x: Tensor, broadcastable: str) -> Tensor:
    """The mask as a tensor shaped like ``x`` (all ones when ``None``), in the dtype of ``x``.

    Raises:
        ValueError: If ``mask`` does not broadcast to ``x`` the way ``broadcastable`` describes.
    """
    if mask is None:
        return torch.ones_like(x)
    try:
        return torch.broadcast_to(mask.to(device=x.device, dtype=x.dtype), x.shape)
    except RuntimeError:
        raise ValueError(
            f"mask of shape {tuple(mask.shape)} does not fit x of shape {tuple(x.shape)}: give "
            f"{broadcastable}"
        ) from None


class MaskedUNet(nn.Module):
    r"""The raw network :math:`F(x, c_{\text{noise}}, M)` for images: a U-Net on :math:`[M x, M]`.

    Arguments:
        in_channels: The image channels :math:`C` (the U-Net reads :math:`2C` and writes
            :math:`C`).
        channels: The channels of each U-Net level.
        blocks: The residual blocks per level (one count or one per level).
        attention_levels: The levels with self-attention (``None`` for the coarsest).
        heads: The attention heads.
        dropout: The dropout probability inside the residual blocks.
        emb_features: The dimension of the noise embedding.

    Attributes:
        config: The constructor arguments, JSON-serialisable: ``MaskedUNet(**net.config)``
            rebuilds the architecture.

    Raises:
        ValueError: If an argument is out of range (see :class:`~cleanprior.nn.unet.UNet`).

    References:
        Daras et al. (2023). Ambient Diffusion: Learning Clean Distributions from Corrupted
        Data. https://arxiv.org/abs/2305.19256
    """

    mask_conditioned = True

    def __init__(
        self,
        in_channels: int = 1,
        channels: Sequence[int] = (32, 64, 128),
        blocks: int | Sequence[int] = 2,
        attention_levels: Sequence[int] | None = None,
        heads: int = 4,
        dropout: float = 0.0,
        emb_features: int = 128,
    ) -> None:
        super().__init__()
        if in_channels <= 0:
            raise ValueError(f"in_channels must be positive, got {in_channels}")
        self.unet = UNet(
            2 * in_channels,
            in_channels,
            channels=channels,
            blocks=blocks,
            attention_levels=attention_levels,
            heads=heads,
            dropout=dropout,
            emb_features=emb_features,
        )
        resolved = self.unet.config
        self.config: dict[str, Any] = {
            "in_channels": int(in_channels),
            **{
                key: resolved[key]
                for key in (
                    "channels",
                    "blocks",
                    "attention_levels",
                    "heads",
                    "dropout",
                    "emb_features",
                )
            },
        }
        self.in_channels = int(in_channels)

    def forward(
        self, x: Tensor, c_noise: Tensor | None = None, mask: Tensor | None = None
    ) -> Tensor:
        r"""Evaluate :math:`F(x, c_{\text{noise}}, M)`.

        Arguments:
            x: Images, shape ``(B, C, H, W)``; entries where the mask is 0 are ignored.
            c_noise: Noise conditioning, shape ``(B,)``, ``(1,)`` or ``()``.
            mask: The kept entries (1) and the erased ones (0), shape ``(B, C, H, W)``, or
                ``(B, 1, H, W)`` for a mask shared by the channels; ``None`` keeps everything.

        Returns:
            The output, shape ``(B, C, H, W)``.

        Raises:
            ValueError: If ``x`` is not a batch of ``C``-channel images or ``mask`` does not fit.
        """
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"MaskedUNet expects x of shape (B, {self.in_channels}, H, W), got {tuple(x.shape)}"
            )
        m = _full_mask(mask, x, "shape (B, C, H, W) or (B, 1, H, W)")
        return self.unet(torch.cat([m * x, m], dim=1), c_noise)


class MaskedMLP(MLP):
    r"""The raw network :math:`F(x, c_{\text{noise}}, M)` for vectors: an MLP on :math:`[M x, M]`.

    The architecture of :class:`~cleanprior.nn.mlp.MLP` with :math:`2d` inputs and :math:`d`
    outputs.

    Arguments:
        features: The dimension :math:`d` of the vectors.
        hidden: The widths of the hidden layers.
        emb_features: The dimension of the sinusoidal embedding of :math:`c_{\text{noise}}`.
        dropout: The dropout probability after each hidden layer.

    Attributes:
        config: The constructor arguments, JSON-serialisable: ``MaskedMLP(**net.config)``
            rebuilds the architecture.

    Raises:
        ValueError: If an argument is out of range (see :class:`~cleanprior.nn.mlp.MLP`).

    References:
        Daras et al. (2023). Ambient Diffusion: Learning Clean Distributions from Corrupted
        Data. https://arxiv.org/abs/2305.19256
    """

    mask_conditioned = True

    def __init__(
        self,
        features: int,
        hidden: Sequence[int] = (256, 256, 256),
        emb_features: int = 64,
        dropout: float = 0.0,
    ) -> None:
        if features <= 0:
            raise ValueError(f"features must be positive, got {features}")
        super().__init__(2 * features, hidden, emb_features, dropout)
        # The parent's output layer maps to its 2d inputs; the estimate has d entries.
        self.layers[-1] = nn.Linear(self.layers[-1].in_features, features)
        self.config = {**self.config, "features": int(features)}
        self.vector_features = int(features)

    def forward(
        self, x: Tensor, c_noise: Tensor | None = None, mask: Tensor | None = None
    ) -> Tensor:
        r"""Evaluate :math:`F(x, c_{\text{noise}}, M)`.

        Arguments:
            x: Vectors, shape ``(B, d)``; entries where the mask is 0 are ignored.
            c_noise: Noise conditioning, shape ``(B,)``, ``(1,)`` or ``()``; ``None`` feeds a
                zero embedding.
            mask: The kept entries (1) and the erased ones (0), shape ``(B, d)``; ``None``
                keeps everything.

        Returns:
            The output vectors, shape ``(B, d)``.

        Raises:
            ValueError: If ``x`` is not of shape ``(B, d)`` or ``mask`` does not fit.
        """
        if x.ndim != 2 or x.shape[1] != self.vector_features:
            raise ValueError(
                f"MaskedMLP expects x of shape (B, {self.vector_features}), got {tuple(x.shape)}"
            )
        m = _full_mask(mask, x, f"shape (B, {self.vector_features})")
        return super().forward(torch.cat([m * x, m], dim=-1), c_noise)
