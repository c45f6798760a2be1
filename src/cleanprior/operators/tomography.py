r"""Parallel-beam tomography: :math:`y = R x`, a discretised Radon transform with its exact transpose.

An image :math:`x` of :math:`N \times N` pixels is indexed by row :math:`i` and column :math:`j`,
with centred coordinates :math:`(j - c, i - c)`, :math:`c = (N - 1) / 2`. The ray of detector bin
:math:`k` at angle :math:`\theta` is the line of offset :math:`s_k = k - (D - 1) / 2` (in pixels):

.. math::

    p_{k l}(\theta) = c + s_k (\cos\theta, \sin\theta) + t_l (-\sin\theta, \cos\theta),
    \qquad t_l = l - (T - 1) / 2,

in (column, row) order, and the projection sums the bilinear interpolation :math:`\mathcal{I}` of the
image (zero outside) at :math:`T` unit-spaced samples along it:

.. math::

    (R x)_{\theta k} = \sum_{l=0}^{T-1} \mathcal{I}[x](p_{k l}(\theta))
                     = \sum_{i, j} W_{\theta k, i j} \, x_{i j}.

The weights :math:`W` are explicit (a sparse matrix per set of angles), so the adjoint is the exact
transpose :math:`R^\top y = W^\top y`, not a filtered backprojection, and
:math:`\langle R x, y \rangle = \langle x, R^\top y \rangle` holds to floating-point precision. At
0 degrees the projection is the column sums :math:`\sum_i x_{i j}`, at 90 degrees the row sums
:math:`\sum_j x_{i j}` (the samples then fall on pixel centres). A bright pixel at :math:`(i, j)`
traces the sinusoid :math:`s = (j - c)\cos\theta + (i - c)\sin\theta`.

By default the detector has :math:`D` bins, the smallest integer :math:`\ge \sqrt 2 N` with the
parity of :math:`N`: rays then cover the image's diagonal (every pixel is seen at every angle) and
at multiples of 90 degrees the bins fall on pixel columns. Rays take as many samples, :math:`T = D`.

References:
    Kak and Slaney (1988). Principles of Computerized Tomographic Imaging, chapter 3 (parallel
    projections, filtered backprojection, the Ram-Lak filter).
    Jin et al. (2017). Deep Convolutional Neural Network for Inverse Problems in Imaging
    (sparse-view CT, FBP initial estimates).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from cleanprior.operators.base import LinearOperator, check_batch, check_finite
from cleanprior.operators.registry import register

__all__ = ["Tomography", "diagonal_detectors"]


def diagonal_detectors(size: int) -> int:
    r"""The smallest number of unit bins :math:`\ge \sqrt 2 N` with the parity of :math:`N`.

    Arguments:
        size: The image side :math:`N`.
    """
    count = math.ceil(math.sqrt(2) * size)
    return count + (count - size) % 2


@register("tomography")
class Tomography(LinearOperator):
    r"""Parallel-beam projections :math:`y = R x` of square images, one set of angles per observation.

    The forward, adjoint and geometry are described in the module docstring. There is no cheap
    exact pseudo-inverse (``has_pinv`` is False); :meth:`fbp` is an approximate inverse for
    initial estimates.

    Arguments:
        angles: Projection angles in degrees, shape ``(1, n_angles)`` (shared),
            ``(B, n_angles)`` (one set per observation) or ``(n_angles,)``.
        size: The image side :math:`N`; images have shape ``(B, C, N, N)`` (``C = 1`` usually).
        detectors: The number of detector bins :math:`D` (unit spacing); default
            :func:`diagonal_detectors` of ``size``. Sinograms have shape ``(B, C, n_angles, D)``.

    The projection matrix and its transpose are built on first use (in float64 on the CPU, then
    cast for each device and dtype) and cached, one block per row of ``angles``: about
    :math:`2 N^2` nonzeros per angle (26 MB per matrix for 64 x 64 and 180 angles in float64),
    so per-item angles cost ``B`` times the memory of shared ones. The ``angles`` buffer must not
    be changed in place afterwards.
    """

    def __init__(self, angles: Tensor, size: int, detectors: int | None = None) -> None:
        super().__init__()
        angles = torch.as_tensor(angles)
        if angles.ndim == 1:
            angles = angles[None]
        if angles.ndim != 2 or angles.shape[1] == 0:
            raise ValueError(f"the parameter 'angles' must have shape (B, n_angles), got {tuple(angles.shape)}")
        if angles.is_complex():
            raise ValueError("the parameter 'angles' must be real (degrees)")
        check_finite("angles", angles)
        if int(size) != size or size < 1:
            raise ValueError(f"the parameter 'size' must be a positive integer, got {size}")
        if detectors is not None and (int(detectors) != detectors or detectors < 1):
            raise ValueError(f"the parameter 'detectors' must be a positive integer, got {detectors}")
        self.register_buffer("angles", angles if angles.is_floating_point() else angles.double())
        self.size = int(size)
        self.detectors = int(detectors) if detectors is not None else diagonal_detectors(self.size)
        self.samples = diagonal_detectors(self.size)
        self._matrices: dict[tuple[torch.device, torch.dtype], tuple[Tensor, Tensor]] = {}

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> Tomography:
        # the cached matrices are rebuilt from the moved angles on first use
        self._matrices.clear()
        return super()._apply(fn, recurse)

    def _check(self, value: Tensor, shape: tuple[int, int], what: str) -> None:
        if value.ndim != 4 or tuple(value.shape[2:]) != shape:
            raise ValueError(f"tomography: the {what} has shape {tuple(value.shape)}, expected (B, C, {shape[0]}, {shape[1]})")
        check_batch("angles", self.angles, value.shape[0])

    def _weights(self, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """The block-diagonal projection matrix W and its transpose as CSR, cached per key."""
        base = (torch.device("cpu"), torch.float64)
        if base not in self._matrices:
            rows, cols, values = _projection_entries(self.angles.detach().cpu().double(), self.size, self.detectors, self.samples)
            n_sets, n_angles = self.angles.shape
            shape = (n_sets * n_angles * self.detectors, n_sets * self.size**2)
            W = torch.sparse_coo_tensor(torch.stack([rows, cols]), values, shape, check_invariants=False).coalesce()
            # Torch warns once that sparse CSR support is in beta; the one product used here
            # (CSR times dense, with autograd) is stable, so the warning would only be noise.
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*Sparse CSR tensor support is in beta.*")
                self._matrices[base] = (W.to_sparse_csr(), W.t().coalesce().to_sparse_csr())
        key = (torch.device(device), dtype)
        if key not in self._matrices:
            W, WT = self._matrices[base]
            self._matrices[key] = (W.to(device=device, dtype=dtype), WT.to(device=device, dtype=dtype))
        return self._matrices[key]

    def _multiply(self, M: Tensor, value: Tensor, rows_out: int) -> Tensor:
        """Multiply every item and channel by its block of ``M``; returns ``(B, C, rows_out)``."""
        B, C = value.shape[:2]
        flat = value.reshape(B, C, -1)
        if self.angles.shape[0] == 1:
            # Shared angles: one block times all B * C images as columns.
            return (M @ flat.reshape(B * C, -1).T).T.reshape(B, C, rows_out)
        # Per-item angles: the block-diagonal matrix times the items stacked along the rows.
        return (M @ flat.transpose(1, 2).reshape(-1, C)).reshape(B, rows_out, C).transpose(1, 2)

    def forward(self, x: Tensor) -> Tensor:
        r"""Project: :math:`y = R x`.

        Arguments:
            x: Images, shape ``(B, C, N, N)``.

        Returns:
            Sinograms, shape ``(B, C, n_angles, D)``.
        """
        self._check(x, (self.size, self.size), "image")
        n_angles = self.angles.shape[1]
        W, _ = self._weights(x.device, x.dtype)
        y = self._multiply(W, x, n_angles * self.detectors)
        return y.reshape(*x.shape[:2], n_angles, self.detectors)

    def adjoint(self, y: Tensor) -> Tensor:
        r"""Back-project exactly: :math:`R^\top y = W^\top y`.

        Arguments:
            y: Sinograms, shape ``(B, C, n_angles, D)``.

        Returns:
            Images, shape ``(B, C, N, N)``.
        """
        self._check(y, (self.angles.shape[1], self.detectors), "sinogram")
        _, WT = self._weights(y.device, y.dtype)
        x = self._multiply(WT, y, self.size**2)
        return x.reshape(*y.shape[:2], self.size, self.size)

    def fbp(self, y: Tensor) -> Tensor:
        r"""Filtered backprojection, an APPROXIMATE inverse for initial estimates.

        .. math::

            \hat x = \frac{\pi}{n_\text{angles}} R^\top (h * y),

        with :math:`h` the Ram-Lak (ramp) filter sampled in space, :math:`h_0 = 1/4`,
        :math:`h_n = -1 / (\pi n)^2` for odd :math:`n`, 0 for even :math:`n`, applied along the
        detector axis with zero padding. It assumes angles spread evenly over [0, 180) degrees and
        is neither :math:`R^+` nor exact: use it to start an iterative or posterior solver.

        Arguments:
            y: Sinograms, shape ``(B, C, n_angles, D)``.

        Returns:
            Images, shape ``(B, C, N, N)``.
        """
        self._check(y, (self.angles.shape[1], self.detectors), "sinogram")
        # Linear convolution without wrap-around needs at least 2D - 1 samples.
        padded = 1 << (2 * self.detectors - 1).bit_length()
        n = torch.arange(padded, device=y.device)
        distance = torch.minimum(n, padded - n).to(y.dtype)
        kernel = torch.where(distance % 2 == 1, -1 / (math.pi * distance) ** 2, 0.0)
        kernel[0] = 0.25
        # The kernel is real and even, so its transform is real.
        response = torch.fft.rfft(kernel).real
        filtered = torch.fft.irfft(torch.fft.rfft(y, n=padded, dim=-1) * response, n=padded, dim=-1)
        return math.pi / self.angles.shape[1] * self.adjoint(filtered[..., : self.detectors])

    def parameters_dict(self) -> dict[str, Any]:
        return {"name": self.name, "angles": self.angles, "size": self.size, "detectors": self.detectors}


def _projection_entries(angles: Tensor, size: int, detectors: int, samples: int) -> tuple[Tensor, Tensor, Tensor]:
    r"""The nonzero entries of the block-diagonal matrix :math:`W` (duplicates not yet summed).

    Arguments:
        angles: Degrees, float64, shape ``(S, n_angles)``, one block per row.
        size: The image side :math:`N`.
        detectors: The bins :math:`D`.
        samples: The samples per ray :math:`T`.

    Returns:
        Row indices (``set * n_angles * D + angle * D + bin``), column indices
        (``set * N^2 + i N + j``) and weights, each of shape ``(nnz,)``.
    """
    n_sets, n_angles = angles.shape
    theta = torch.deg2rad(angles).reshape(-1, 1, 1)
    s = (torch.arange(detectors, dtype=torch.float64) - (detectors - 1) / 2)[:, None]
    t = torch.arange(samples, dtype=torch.float64) - (samples - 1) / 2
    centre = (size - 1) / 2
    column = (centre + s * torch.cos(theta) - t * torch.sin(theta)).reshape(-1)
    row = (centre + s * torch.sin(theta) + t * torch.cos(theta)).reshape(-1)
    # About half of the samples of a diagonal-covering ray miss the image: drop them first.
    near = ((column > -1) & (column < size) & (row > -1) & (row < size)).nonzero().squeeze(1)
    column, row = column[near], row[near]
    j0, i0 = column.floor(), row.floor()
    fj, fi = column - j0, row - i0
    i = i0.long()[:, None] + torch.tensor([0, 0, 1, 1])
    j = j0.long()[:, None] + torch.tensor([0, 1, 0, 1])
    w = torch.stack([(1 - fi) * (1 - fj), (1 - fi) * fj, fi * (1 - fj), fi * fj], 1)
    keep = ((i >= 0) & (i < size) & (j >= 0) & (j < size) & (w != 0)).reshape(-1).nonzero().squeeze(1)
    ray = near // samples
    pixel = (ray // (n_angles * detectors) * size**2)[:, None] + i * size + j
    return ray[keep // 4], pixel.reshape(-1)[keep], w.reshape(-1)[keep]
