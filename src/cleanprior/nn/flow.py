r"""A conditional normalizing flow :math:`q_\phi(x \mid c)` for images and vectors.

The flow is an invertible map :math:`x = f_\phi(z; c)` of a standard normal :math:`z`, so that

.. math::
    \log q_\phi(x \mid c) = \log \mathcal{N}(z; 0, I) - \log \left| \det \frac{\partial f_\phi(z; c)}{\partial z} \right|,
    \qquad z = f_\phi^{-1}(x; c).

It composes, in the generative direction (base to data),

1. a per-dimension scale :math:`h = e^{\beta} \odot z` (learned, or fixed at ``base_scale``);
2. for images, a squeeze (space-to-depth, :math:`(C, H, W) \to (4C, H/2, W/2)`), then ``layers``
   steps of ActNorm, an invertible linear map of the channels (a :math:`1 \times 1` convolution
   parameterised by its LU decomposition) and an affine coupling on one half of the channels
   (alternating halves), then the inverse squeeze; for vectors the same steps on the features;
3. ``checkerboard`` steps of ActNorm and an affine coupling on one parity of the pixels (of the
   indices, for vectors), alternating parities.

An affine coupling with a binary mask :math:`b` leaves :math:`b \odot h` unchanged and maps the
rest as

.. math::
    h' = b \odot h + (1 - b) \odot \big(h \odot e^{s} + t\big), \qquad
    (s, t) = \mathrm{NN}([b \odot h, b, c]), \qquad
    \log |\det J| = \textstyle\sum (1 - b) \odot s,

with :math:`s = \kappa \tanh(\tilde s / \kappa)` bounded by ``scale_bound`` :math:`\kappa` so that
no step can blow up. The conditioner NN is a small residual CNN for images, a residual MLP for
vectors; it sees the untouched half and the condition :math:`c`, and its last layer starts at zero.
ActNorm (:math:`h' = e^{a} \odot h + m`, per channel) and the LU map start at the identity, so an
untrained flow is :math:`x = \text{base\_scale} \cdot z`.

References:
    Dinh, Sohl-Dickstein & Bengio (2017). Density estimation using Real NVP (affine couplings,
    checkerboard and channel masks, squeeze). https://arxiv.org/abs/1605.08803
    Kingma & Dhariwal (2018). Glow: Generative Flow with Invertible 1x1 Convolutions (ActNorm, LU
    parameterisation). https://arxiv.org/abs/1807.03039
    Winkler et al. (2019). Learning Likelihoods with Conditional Normalizing Flows.
    https://arxiv.org/abs/1912.00042
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ActNorm", "AffineCoupling", "ConditionalFlow", "InvertibleLinear", "Squeeze"]


def _channel_view(parameter: Tensor, like: Tensor) -> Tensor:
    """A per-channel parameter ``(C,)`` shaped to multiply ``like`` of shape ``(B, C, *spatial)``."""
    return parameter.reshape((1, -1) + (1,) * (like.ndim - 2)).to(like.dtype)


def _positions(h: Tensor) -> int:
    """The number of positions (pixels) sharing each channel's parameters: 1 for vectors."""
    return math.prod(h.shape[2:])


class ActNorm(nn.Module):
    r"""A per-channel affine map :math:`h' = e^{a} \odot h + m`, starting at the identity.

    Glow initialises :math:`(a, m)` from the first batch; here they start at zero so that the
    untrained flow is the identity, and the scale is learned like any other parameter.

    Arguments:
        channels: The number of channels (features, for vectors) :math:`C`.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.log_scale = nn.Parameter(torch.zeros(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, h: Tensor, c: Tensor | None = None) -> tuple[Tensor, Tensor]:
        r"""Apply the map.

        Arguments:
            h: Inputs, shape ``(B, C, *spatial)`` (``(B, C)`` for vectors).
            c: Unused (the map is not conditional).

        Returns:
            The outputs, shaped like ``h``, and :math:`\log |\det J|`, shape ``(B,)``.
        """
        out = h * torch.exp(_channel_view(self.log_scale, h)) + _channel_view(self.bias, h)
        return out, (self.log_scale.sum() * _positions(h)).to(h.dtype).expand(h.shape[0])

    def inverse(self, h: Tensor, c: Tensor | None = None) -> tuple[Tensor, Tensor]:
        r"""Undo the map; the log-determinant is that of the inverse, :math:`-\log |\det J|`."""
        out = (h - _channel_view(self.bias, h)) * torch.exp(-_channel_view(self.log_scale, h))
        return out, (-self.log_scale.sum() * _positions(h)).to(h.dtype).expand(h.shape[0])


class InvertibleLinear(nn.Module):
    r"""An invertible map of the channels, :math:`h' = W h` at every pixel (a :math:`1 \times 1` convolution).

    :math:`W = L (U + \operatorname{diag}(e^{v}))` with :math:`L` unit lower triangular and
    :math:`U` strictly upper triangular (Glow's LU parameterisation with the permutation fixed to
    the identity), so :math:`\log |\det W| = \sum v` costs nothing and :math:`W^{-1}` is two
    triangular solves. It starts at :math:`W = I`.

    Arguments:
        channels: The number of channels (features, for vectors) :math:`C`.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.lower = nn.Parameter(torch.zeros(channels, channels))
        self.upper = nn.Parameter(torch.zeros(channels, channels))
        self.log_diagonal = nn.Parameter(torch.zeros(channels))
        self.register_buffer("strictly_lower", torch.tril(torch.ones(channels, channels), -1), persistent=False)

    def factors(self) -> tuple[Tensor, Tensor]:
        r"""The triangular factors :math:`(L, U + \operatorname{diag}(e^{v}))`, each ``(C, C)``."""
        unit = torch.eye(self.lower.shape[0], dtype=self.lower.dtype, device=self.lower.device)
        L = self.lower * self.strictly_lower + unit
        R = self.upper * self.strictly_lower.T + torch.diag(torch.exp(self.log_diagonal))
        return L, R

    def weight(self) -> Tensor:
        """The matrix :math:`W`, shape ``(C, C)``."""
        L, R = self.factors()
        return L @ R

    def forward(self, h: Tensor, c: Tensor | None = None) -> tuple[Tensor, Tensor]:
        r"""Apply :math:`W`.

        Arguments:
            h: Inputs, shape ``(B, C, *spatial)`` (``(B, C)`` for vectors).
            c: Unused.

        Returns:
            The outputs, shaped like ``h``, and :math:`\log |\det J|`, shape ``(B,)``.
        """
        out = torch.einsum("ij,bj...->bi...", self.weight().to(h.dtype), h)
        return out, (self.log_diagonal.sum() * _positions(h)).to(h.dtype).expand(h.shape[0])

    def inverse(self, h: Tensor, c: Tensor | None = None) -> tuple[Tensor, Tensor]:
        r"""Apply :math:`W^{-1}` by two triangular solves; the log-determinant is :math:`-\log |\det W|` per pixel."""
        L, R = (factor.to(h.dtype) for factor in self.factors())
        columns = h.transpose(0, 1).reshape(h.shape[1], -1)
        columns = torch.linalg.solve_triangular(L, columns, upper=False, unitriangular=True)
        columns = torch.linalg.solve_triangular(R, columns, upper=True)
        out = columns.reshape(h.shape[1], h.shape[0], *h.shape[2:]).transpose(0, 1)
        return out, (-self.log_diagonal.sum() * _positions(h)).to(h.dtype).expand(h.shape[0])


class Squeeze(nn.Module):
    r"""Space-to-depth in the normalizing direction, :math:`(C, H, W) \to (4C, H/2, W/2)`; volume-preserving.

    In the generative direction (:meth:`forward`) it is depth-to-space, since the flow's
    generative pass runs from the squeezed base to the image.
    """

    def forward(self, h: Tensor, c: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Depth-to-space: ``(B, 4C, H/2, W/2) -> (B, C, H, W)``; log-determinant 0."""
        return F.pixel_shuffle(h, 2), h.new_zeros(h.shape[0])

    def inverse(self, h: Tensor, c: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Space-to-depth: ``(B, C, H, W) -> (B, 4C, H/2, W/2)``; log-determinant 0."""
        return F.pixel_unshuffle(h, 2), h.new_zeros(h.shape[0])


class _ConvResidual(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, h: Tensor) -> Tensor:
        return h + self.conv2(F.silu(self.conv1(F.silu(h))))


class _LinearResidual(nn.Module):
    def __init__(self, features: int) -> None:
        super().__init__()
        self.linear1 = nn.Linear(features, features)
        self.linear2 = nn.Linear(features, features)

    def forward(self, h: Tensor) -> Tensor:
        return h + self.linear2(F.silu(self.linear1(F.silu(h))))


def _conditioner(image: bool, in_channels: int, out_channels: int, hidden: int, blocks: int) -> nn.Sequential:
    """A residual CNN (images) or MLP (vectors) whose last layer starts at zero."""
    if image:
        first = nn.Conv2d(in_channels, hidden, 3, padding=1)
        body = [_ConvResidual(hidden) for _ in range(blocks)]
        last = nn.Conv2d(hidden, out_channels, 3, padding=1)
    else:
        first = nn.Linear(in_channels, hidden)
        body = [_LinearResidual(hidden) for _ in range(blocks)]
        last = nn.Linear(hidden, out_channels)
    # A zero last layer gives s = t = 0: every coupling starts as the identity.
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)
    return nn.Sequential(first, *body, nn.SiLU(), last)


class AffineCoupling(nn.Module):
    r"""An affine coupling :math:`h' = b \odot h + (1 - b) \odot (h \odot e^{s} + t)`.

    Arguments:
        mask: The binary mask :math:`b` of the untouched entries, shape ``(C, *spatial)`` (one
            sample's shape).
        cond_channels: The channels (features, for vectors) of the condition :math:`c`.
        hidden: The conditioner's width.
        blocks: The conditioner's residual blocks.
        scale_bound: :math:`\kappa > 0`, the bound of :math:`|s|`.
    """

    def __init__(self, mask: Tensor, cond_channels: int, hidden: int, blocks: int, scale_bound: float) -> None:
        super().__init__()
        self.register_buffer("mask", mask.float(), persistent=False)
        channels = mask.shape[0]
        self.scale_bound = float(scale_bound)
        self.conditioner = _conditioner(mask.ndim > 1, 2 * channels + cond_channels, 2 * channels, hidden, blocks)

    def _shift_and_scale(self, untouched: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        b = self.mask.to(untouched.dtype).expand(untouched.shape)
        raw_s, t = self.conditioner(torch.cat([untouched, b, c.to(untouched.dtype)], dim=1)).chunk(2, dim=1)
        s = self.scale_bound * torch.tanh(raw_s / self.scale_bound)
        return s * (1 - b), t * (1 - b)

    def forward(self, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        r"""Apply the coupling.

        Arguments:
            h: Inputs, shape ``(B, C, *spatial)`` (``(B, C)`` for vectors).
            c: The condition at this resolution, shape ``(B, C_c, *spatial)``.

        Returns:
            The outputs, shaped like ``h``, and :math:`\log |\det J| = \sum (1 - b) \odot s`, shape ``(B,)``.
        """
        s, t = self._shift_and_scale(h * self.mask.to(h.dtype), c)
        return h * torch.exp(s) + t, s.flatten(1).sum(1)

    def inverse(self, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        r"""Undo the coupling; :math:`(s, t)` depend only on the untouched entries, which it keeps."""
        s, t = self._shift_and_scale(h * self.mask.to(h.dtype), c)
        return (h - t) * torch.exp(-s), -s.flatten(1).sum(1)


def _checkerboard(shape: tuple[int, ...], parity: int) -> Tensor:
    """Ones where the pixel's (row + column), or the vector's index, has the given parity."""
    if len(shape) == 1:
        return (torch.arange(shape[0]) % 2 == parity).float()
    rows, cols = torch.arange(shape[1])[:, None], torch.arange(shape[2])[None, :]
    return ((rows + cols) % 2 == parity).float().expand(shape).clone()


def _halves(shape: tuple[int, ...], flip: bool) -> Tensor:
    """Ones on the first ``C // 2`` channels (features), or on the others when ``flip``."""
    first = torch.zeros(shape)
    first[: shape[0] // 2] = 1
    return 1 - first if flip else first


class ConditionalFlow(nn.Module):
    r"""A conditional normalizing flow :math:`x = f_\phi(z; c)`, :math:`z \sim \mathcal{N}(0, I)`.

    Arguments:
        shape: One sample's shape: ``(C, H, W)`` with :math:`H, W` even, or ``(d,)`` with
            :math:`d \geq 2`.
        cond_channels: The channels :math:`C_c` of the condition, of shape ``(B, C_c, H, W)``
            for images, or its features :math:`d_c`, shape ``(B, d_c)``, for vectors.
        hidden: The conditioners' width (channels or features).
        layers: Steps (ActNorm, LU map, channel coupling) on the squeezed image (on the vector).
        checkerboard: Steps (ActNorm, checkerboard coupling) at full resolution.
        blocks: Residual blocks per conditioner.
        invertible_linear: Whether the channel steps mix channels with the LU map (otherwise
            the alternating halves alone mix them).
        scale_bound: :math:`\kappa > 0`, the bound of every coupling's log-scale.
        base_scale: The untrained flow's scale: :math:`x = \text{base\_scale} \cdot z` at
            initialisation.
        learn_base_scale: Whether the per-dimension base scale is learned.

    Attributes:
        config: The constructor arguments, JSON-serialisable: ``ConditionalFlow(**flow.config)``
            rebuilds the architecture.

    Raises:
        ValueError: For a shape the flow cannot take or a size out of range.
    """

    def __init__(
        self,
        shape: Sequence[int],
        cond_channels: int,
        hidden: int = 64,
        layers: int = 8,
        checkerboard: int = 2,
        blocks: int = 2,
        invertible_linear: bool = True,
        scale_bound: float = 2.0,
        base_scale: float = 1.0,
        learn_base_scale: bool = True,
    ) -> None:
        super().__init__()
        shape = tuple(int(s) for s in shape)
        if len(shape) not in (1, 3) or any(s < 1 for s in shape):
            raise ValueError(f"shape must be (C, H, W) or (d,) with positive sizes, got {shape}")
        if len(shape) == 3 and (shape[1] % 2 or shape[2] % 2):
            raise ValueError(f"the flow squeezes 2x2 blocks: the height and width of shape {shape} must be even")
        if len(shape) == 1 and shape[0] < 2:
            raise ValueError(f"a coupling splits the features in two: vectors need d >= 2, got shape {shape}")
        for name, value, least in (("cond_channels", cond_channels, 1), ("hidden", hidden, 1), ("layers", layers, 0),
                                   ("checkerboard", checkerboard, 0), ("blocks", blocks, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
        if not scale_bound > 0 or not base_scale > 0:
            raise ValueError(f"scale_bound and base_scale must be positive, got {scale_bound} and {base_scale}")
        self.config: dict[str, Any] = {
            "shape": list(shape),
            "cond_channels": cond_channels,
            "hidden": hidden,
            "layers": layers,
            "checkerboard": checkerboard,
            "blocks": blocks,
            "invertible_linear": bool(invertible_linear),
            "scale_bound": float(scale_bound),
            "base_scale": float(base_scale),
            "learn_base_scale": bool(learn_base_scale),
        }
        self.shape = shape
        self.cond_channels = cond_channels
        self.image = len(shape) == 3

        log_base = torch.full(shape, math.log(base_scale))
        if learn_base_scale:
            self.log_base_scale = nn.Parameter(log_base)
        else:
            self.register_buffer("log_base_scale", log_base)

        inner = (4 * shape[0], shape[1] // 2, shape[2] // 2) if self.image else shape
        inner_cond = 4 * cond_channels if self.image else cond_channels
        steps: list[nn.Module] = []
        for i in range(layers):
            steps.append(ActNorm(inner[0]))
            if invertible_linear:
                steps.append(InvertibleLinear(inner[0]))
            steps.append(AffineCoupling(_halves(inner, flip=i % 2 == 1), inner_cond, hidden, blocks, scale_bound))
        # ordered in the generative direction: from the base to the data
        self.coarse = nn.ModuleList(steps)
        fine: list[nn.Module] = []
        for i in range(checkerboard):
            fine.append(ActNorm(shape[0]))
            fine.append(AffineCoupling(_checkerboard(shape, parity=i % 2), cond_channels, hidden, blocks, scale_bound))
        self.fine = nn.ModuleList(fine)
        self.squeeze = Squeeze()

    @property
    def features(self) -> int:
        """The dimension :math:`d` of one sample."""
        return math.prod(self.shape)

    def _check(self, name: str, x: Tensor, c: Tensor) -> None:
        if not isinstance(x, Tensor) or tuple(x.shape[1:]) != self.shape or x.ndim != len(self.shape) + 1:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"{name} must have shape (B, {', '.join(map(str, self.shape))}), got {got}")
        expected = (x.shape[0], self.cond_channels, *self.shape[1:])
        if not isinstance(c, Tensor) or tuple(c.shape) != expected:
            got = tuple(c.shape) if isinstance(c, Tensor) else type(c).__name__
            raise ValueError(f"the condition c must have shape {expected} for {name} of shape {tuple(x.shape)}, got {got}")

    def forward(self, z: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        r"""The generative map :math:`x = f_\phi(z; c)`.

        Arguments:
            z: Base samples, shape ``(B, *shape)``.
            c: Conditions, shape ``(B, C_c, H, W)`` (images) or ``(B, d_c)`` (vectors).

        Returns:
            ``x``, shape ``(B, *shape)``, and :math:`\log |\det \partial x / \partial z|`,
            shape ``(B,)``.

        Raises:
            ValueError: If ``z`` or ``c`` has the wrong shape.
        """
        self._check("z", z, c)
        h = z * torch.exp(self.log_base_scale.to(z.dtype))
        logdet = self.log_base_scale.sum().to(z.dtype).expand(z.shape[0])
        if self.image:
            h = F.pixel_unshuffle(h, 2)
        coarse_c = F.pixel_unshuffle(c, 2) if self.image else c
        for layer in self.coarse:
            h, step = layer(h, coarse_c)
            logdet = logdet + step
        if self.image:
            h, _ = self.squeeze(h)
        for layer in self.fine:
            h, step = layer(h, c)
            logdet = logdet + step
        return h, logdet

    def inverse(self, x: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        r"""The normalizing map :math:`z = f_\phi^{-1}(x; c)`.

        Arguments:
            x: Samples, shape ``(B, *shape)``.
            c: Conditions, as in :meth:`forward`.

        Returns:
            ``z``, shape ``(B, *shape)``, and :math:`\log |\det \partial z / \partial x|`,
            shape ``(B,)``.

        Raises:
            ValueError: If ``x`` or ``c`` has the wrong shape.
        """
        self._check("x", x, c)
        h, logdet = x, x.new_zeros(x.shape[0])
        for layer in reversed(self.fine):
            h, step = layer.inverse(h, c)
            logdet = logdet + step
        if self.image:
            h, _ = self.squeeze.inverse(h)
        coarse_c = F.pixel_unshuffle(c, 2) if self.image else c
        for layer in reversed(self.coarse):
            h, step = layer.inverse(h, coarse_c)
            logdet = logdet + step
        if self.image:
            h = F.pixel_shuffle(h, 2)
        z = h * torch.exp(-self.log_base_scale.to(x.dtype))
        return z, logdet - self.log_base_scale.sum().to(x.dtype)

    def _log_normal(self, z: Tensor) -> Tensor:
        return -0.5 * z.flatten(1).pow(2).sum(1) - 0.5 * self.features * math.log(2 * math.pi)

    def log_prob(self, x: Tensor, c: Tensor) -> Tensor:
        r"""The log-density :math:`\log q_\phi(x \mid c)`.

        Arguments:
            x: Samples, shape ``(B, *shape)``.
            c: Conditions, as in :meth:`forward`.

        Returns:
            Log-densities, shape ``(B,)``.
        """
        z, logdet = self.inverse(x, c)
        return self._log_normal(z) + logdet

    def sample(self, c: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        r"""One reparameterised sample per condition, with its log-density.

        Gradients flow from both outputs to the flow's parameters (and to ``c``).

        Arguments:
            c: Conditions, as in :meth:`forward`; one sample is drawn per row (repeat rows for
                more). They are cast to the flow's dtype.
            generator: The source of :math:`z` (on the device of ``c``).

        Returns:
            ``x``, shape ``(B, *shape)``, and :math:`\log q_\phi(x \mid c)`, shape ``(B,)``, in
            the flow's dtype.
        """
        if not isinstance(c, Tensor) or c.ndim < 1:
            raise ValueError(f"the condition c must be a tensor of shape (B, {self.cond_channels}, ...), got {c!r}")
        z = torch.randn((c.shape[0], *self.shape), generator=generator, device=c.device, dtype=self.log_base_scale.dtype)
        x, logdet = self.forward(z, c.to(z.dtype))
        return x, self._log_normal(z) - logdet

    def extra_repr(self) -> str:
        return f"shape={self.shape}, cond_channels={self.cond_channels}"
