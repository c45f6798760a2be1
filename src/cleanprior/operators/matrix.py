r"""Dense matrices: :math:`y = A x` with one matrix per observation (random projections).

References:
    Rozet et al. (2024). DiEM, section 5.1: rows drawn uniformly on the unit sphere.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from cleanprior.operators.base import LinearOperator, check_batch, check_finite
from cleanprior.operators.registry import register

__all__ = ["Matrix", "random_projection"]


@register("matrix")
class Matrix(LinearOperator):
    r"""A dense linear map :math:`y = A x` on flattened signals.

    Arguments:
        A: Shape ``(1, m, d)`` (shared), ``(B, m, d)`` (one per observation) or ``(m, d)``.
        x_shape: The shape of one signal (``(d,)`` by default); signals of shape
            ``(B, *x_shape)`` are flattened, measurements have shape ``(B, m)``.
    """

    has_pinv = True

    def __init__(self, A: Tensor, x_shape: Sequence[int] | None = None) -> None:
        super().__init__()
        A = torch.as_tensor(A)
        if A.ndim == 2:
            A = A[None]
        if A.ndim != 3:
            raise ValueError(f"the parameter 'A' must have shape (B, m, d), got {tuple(A.shape)}")
        check_finite("A", A)
        self.register_buffer("A", A if A.is_floating_point() or A.is_complex() else A.float())
        self.x_shape = tuple(int(s) for s in x_shape) if x_shape is not None else (A.shape[-1],)
        if torch.Size(self.x_shape).numel() != A.shape[-1]:
            raise ValueError(f"x_shape {self.x_shape} does not hold d={A.shape[-1]} values")
        self._pinv: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        if tuple(x.shape[1:]) != self.x_shape:
            raise ValueError(f"matrix: the signal has shape {tuple(x.shape[1:])}, the operator takes {self.x_shape}")
        check_batch("A", self.A, x.shape[0])
        return _apply(self.A.to(x.dtype), x.reshape(x.shape[0], -1))

    def adjoint(self, y: Tensor) -> Tensor:
        if y.ndim != 2 or y.shape[1] != self.A.shape[1]:
            raise ValueError(f"matrix: the measurement has shape {tuple(y.shape)}, the operator gives (B, {self.A.shape[1]})")
        check_batch("A", self.A, y.shape[0])
        return _apply(self.A.to(y.dtype).conj().mT, y).reshape(y.shape[0], *self.x_shape)

    def pinv(self, y: Tensor) -> Tensor:
        if y.ndim != 2 or y.shape[1] != self.A.shape[1]:
            raise ValueError(f"matrix: the measurement has shape {tuple(y.shape)}, the operator gives (B, {self.A.shape[1]})")
        check_batch("A", self.A, y.shape[0])
        if self._pinv is None or self._pinv.device != self.A.device:
            wide = torch.complex128 if self.A.is_complex() else torch.float64
            self._pinv = torch.linalg.pinv(self.A.to(wide)).to(self.A.dtype)
        return _apply(self._pinv.to(y.dtype), y).reshape(y.shape[0], *self.x_shape)

    def parameters_dict(self) -> dict[str, Any]:
        return {"name": self.name, "A": self.A, "x_shape": list(self.x_shape)}

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> Matrix:
        # the cached pseudo-inverse is recomputed from the moved matrix at its new precision
        self._pinv = None
        return super()._apply(fn, recurse)


def _apply(M: Tensor, v: Tensor) -> Tensor:
    """Batched matrix-vector products ``M_b v_b``; a shared matrix (``M.shape[0] == 1``) is one GEMM."""
    if M.shape[0] == 1:
        return v @ M[0].mT
    return torch.einsum("bij,bj->bi", M, v)


def random_projection(
    m: int,
    d: int,
    *,
    batch: int = 1,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    r"""Random matrices whose rows are uniform on the unit sphere :math:`S^{d-1}`.

    Returns:
        Shape ``(batch, m, d)``.
    """
    if m < 1 or d < 1:
        raise ValueError(f"m and d must be positive, got m={m}, d={d}")
    A = torch.randn(batch, m, d, generator=generator, dtype=dtype, device=device)
    return A / A.norm(dim=-1, keepdim=True)
