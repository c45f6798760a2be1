r"""The operator interface: forward models :math:`y = A(x)` with their adjoints.

Every measurement (a mask, a blur, MRI k-space sampling, tomographic projections, a network) is an
:class:`Operator`, a ``torch.nn.Module`` called as ``A(x)``:

- ``forward(x)`` maps a batch ``x`` of shape ``(B, *x_shape)`` to ``y`` of shape ``(B, *y_shape)``;
- ``vjp(x, v)`` is the vector-Jacobian product :math:`J_A(x)^\top v` (autograd by default);
- a :class:`LinearOperator` adds ``adjoint(y)`` (:math:`A^\top y`, or :math:`A^H y` for complex
  data), ``gram(x)`` (:math:`A^\top A x`) and, where it is cheap and exact, ``pinv(y)``
  (:math:`A^+ y`, the Moore-Penrose pseudo-inverse) with ``has_pinv = True``.

Parameters that differ per observation (masks, kernels, matrices, angles, coil maps) are buffers
with a leading batch dimension of 1 (shared) or ``B`` (one per observation), so operators move
with ``.to(device)`` and travel with the data: :meth:`Operator.parameters_dict` gives the name and
parameters that ``cleanprior.operator(name, **params)`` rebuilds the operator from, and that
observation files store.

For complex outputs of a real input (k-space of a real image), the inner product is
:math:`\langle u, v \rangle = \operatorname{Re} \sum \bar u v`, so the adjoint of a map
:math:`\mathbb{R}^n \to \mathbb{C}^m` returns the real part of :math:`A^H y`.

References:
    Tachella et al. (2023). DeepInverse: a deep learning framework for imaging inverse problems
    (the Physics / LinearPhysics interface). https://deepinv.github.io
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar, TypeVar

import torch
from torch import Tensor, nn

__all__ = [
    "Operator",
    "LinearOperator",
    "FunctionOperator",
    "as_operator",
    "inner",
    "check_finite",
    "check_batch",
    "matching_dtype",
]

O = TypeVar("O", bound="Operator")


def matching_dtype(dtype: torch.dtype, like: Tensor) -> torch.dtype:
    """``dtype`` at the precision it names, complex where ``like`` is complex and real where it is real.

    A move to float32 turns a complex128 parameter (a complex matrix, coil maps) into complex64
    rather than dropping its imaginary part, as ``nn.Module.to`` would.
    """
    real = dtype.to_real()
    return real.to_complex() if like.is_complex() else real


def inner(u: Tensor, v: Tensor) -> Tensor:
    r"""The real inner product per batch element, :math:`\operatorname{Re} \sum \bar u v`.

    Arguments:
        u: Shape ``(B, ...)``, real or complex.
        v: Same shape as ``u``.

    Returns:
        Shape ``(B,)``, real.
    """
    product = torch.conj(u) * v if u.is_complex() or v.is_complex() else u * v
    return torch.real(product).reshape(u.shape[0], -1).sum(1)


def check_finite(name: str, value: Tensor) -> Tensor:
    """Raise ValueError naming ``name`` if ``value`` has NaN or infinite entries."""
    if not torch.isfinite(torch.view_as_real(value) if value.is_complex() else value).all():
        raise ValueError(f"the parameter '{name}' contains NaN or infinite values")
    return value


def check_batch(name: str, parameter: Tensor, batch: int) -> None:
    """Raise ValueError unless a per-item parameter's leading dimension is 1 or ``batch``."""
    if parameter.shape[0] not in (1, batch):
        raise ValueError(
            f"the parameter '{name}' holds {parameter.shape[0]} items but the batch has {batch}: "
            "give one per observation or a single shared one"
        )


class Operator(nn.Module):
    r"""A forward model :math:`y = A(x)`, batch first.

    Subclasses implement :meth:`forward` and, to be saved and rebuilt by name, set ``name`` and
    implement :meth:`parameters_dict`.
    """

    name: ClassVar[str] = ""
    linear: ClassVar[bool] = False

    def forward(self, x: Tensor) -> Tensor:
        """Apply the operator.

        Arguments:
            x: Signals, shape ``(B, *x_shape)``.

        Returns:
            Measurements, shape ``(B, *y_shape)``.
        """
        raise NotImplementedError

    def vjp(self, x: Tensor, v: Tensor) -> Tensor:
        r"""The vector-Jacobian product :math:`J_A(x)^\top v`, by autograd.

        Arguments:
            x: The linearisation point, shape ``(B, *x_shape)``.
            v: A cotangent, shape ``(B, *y_shape)``.

        Returns:
            Shape ``(B, *x_shape)``.
        """
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            y = self.forward(x)
            if y.shape != v.shape:
                raise ValueError(f"{self._label()}: the cotangent has shape {tuple(v.shape)}, the output {tuple(y.shape)}")
            (grad,) = torch.autograd.grad(y, x, v.to(y.dtype))
        return grad

    def adjoint(self, y: Tensor) -> Tensor:
        r"""Apply :math:`A^\top` (:math:`A^H` for complex data); only linear operators have one.

        Arguments:
            y: Measurements, shape ``(B, *y_shape)``.

        Returns:
            Shape ``(B, *x_shape)``.

        Raises:
            TypeError: If the operator is not linear (use :meth:`vjp` at a point instead).
        """
        raise TypeError(f"{self._label()} is not linear: it has no adjoint; use vjp(x, v) at a point")

    def gram(self, x: Tensor) -> Tensor:
        r"""Apply :math:`A^\top A`; subclasses override it when it is cheaper than two products.

        Arguments:
            x: Shape ``(B, *x_shape)``.

        Returns:
            Shape ``(B, *x_shape)``.
        """
        return self.adjoint(self.forward(x))

    def parameters_dict(self) -> dict[str, Any]:
        """The operator's name and parameters: ``operator(**parameters_dict())`` rebuilds it."""
        raise NotImplementedError(f"{type(self).__name__} cannot be saved by name")

    def to(self: O, device: torch.device | str | torch.dtype | None = None,  # type: ignore[override]
           dtype: torch.dtype | None = None, non_blocking: bool = False) -> O:
        """Move every parameter tensor to ``device`` and its floating-point ones to ``dtype``, in place.

        Buffers, submodules (parts of a composition, a wrapped network) and plain tensor
        attributes all move; complex parameters keep being complex at ``dtype``'s precision;
        integer ones only change device. ``A.to(torch.float64)`` also works. Tensors a wrapped
        callable closes over (:class:`FunctionOperator`) are the callable's own and stay.

        Arguments:
            device: The target device (None: stay).
            dtype: The target floating-point precision (None: keep).
            non_blocking: Copy asynchronously where the devices allow it.

        Returns:
            ``self``.
        """
        if isinstance(device, torch.dtype):
            device, dtype = None, device

        def convert(t: Tensor) -> Tensor:
            if dtype is None or not (t.is_floating_point() or t.is_complex()):
                return t.to(device, non_blocking=non_blocking)
            return t.to(device, matching_dtype(dtype, t), non_blocking=non_blocking)

        return self._apply(convert)

    def _apply(self: O, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> O:
        # nn.Module moves parameters and buffers only; tensors an operator keeps as plain
        # attributes must follow too, or a moved operator mixes devices
        super()._apply(fn, recurse)
        for name, value in list(vars(self).items()):
            if isinstance(value, Tensor):
                setattr(self, name, fn(value))
        return self

    def _label(self) -> str:
        return self.name or type(self).__name__


class LinearOperator(Operator):
    r"""A linear forward model with its adjoint.

    The contract every subclass is tested against: :math:`\langle A x, y \rangle = \langle x, A^\top y
    \rangle` to float64 precision, ``gram(x) == adjoint(forward(x))``, and where ``has_pinv``:
    :math:`A A^+ A = A` and :math:`A^+ A A^+ = A^+`.
    """

    linear: ClassVar[bool] = True
    has_pinv: ClassVar[bool] = False

    def adjoint(self, y: Tensor) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement adjoint")

    def pinv(self, y: Tensor) -> Tensor:
        r"""Apply the pseudo-inverse :math:`A^+`, where it is cheap and exact (``has_pinv``).

        Arguments:
            y: Shape ``(B, *y_shape)``.

        Returns:
            Shape ``(B, *x_shape)``.
        """
        raise NotImplementedError(f"{self._label()} has no cheap exact pseudo-inverse; use a least-squares solver")

    def vjp(self, x: Tensor, v: Tensor) -> Tensor:
        return self.adjoint(v)


class FunctionOperator(Operator):
    r"""Any differentiable callable ``x -> y`` as an operator; its adjoint comes from autograd.

    With ``linear=True`` the map is taken to be linear: :meth:`adjoint` is the vector-Jacobian
    product at 0 (the same at every point for a linear map), which needs the input shape, given
    as ``x_shape`` or learned from the first call of :meth:`forward`.

    Arguments:
        function: The map, batch first.
        linear: Whether the map is linear.
        x_shape: The shape of one input, without the batch dimension.
    """

    def __init__(self, function: Callable[[Tensor], Tensor], *, linear: bool = False, x_shape: Sequence[int] | None = None) -> None:
        super().__init__()
        if not callable(function):
            raise TypeError(f"an operator must be callable, got {type(function).__name__}")
        self.function = function
        self.is_linear = bool(linear)
        self.x_shape = tuple(x_shape) if x_shape is not None else None
        self._reference: Tensor | None = None

    @property
    def linear(self) -> bool:  # type: ignore[override]
        return self.is_linear

    def forward(self, x: Tensor) -> Tensor:
        if self.x_shape is None:
            self.x_shape = tuple(x.shape[1:])
        self._reference = x.new_zeros((1, *x.shape[1:]))
        return self.function(x)

    def adjoint(self, y: Tensor) -> Tensor:
        r"""The vector-Jacobian product at 0, :math:`A^\top y` for a linear map.

        Raises:
            TypeError: If the map was not declared linear.
            ValueError: If the input shape is unknown (give ``x_shape``).
        """
        if not self.is_linear:
            raise TypeError("this callable was not declared linear (linear=True): use vjp(x, v) at a point instead")
        if self.x_shape is None:
            raise ValueError("the input shape of this callable is unknown: pass x_shape=... or call it once")
        dtype = self._reference.dtype if self._reference is not None else (y.real.dtype if y.is_complex() else y.dtype)
        x = torch.zeros((y.shape[0], *self.x_shape), dtype=dtype, device=y.device)
        return Operator.vjp(self, x, y)

    def vjp(self, x: Tensor, v: Tensor) -> Tensor:
        return Operator.vjp(self, x, v)


def as_operator(value: Any, *, linear: bool | None = None, x_shape: Sequence[int] | None = None) -> Operator:
    """Accept an operator, a deepinv ``Physics``, or any differentiable callable.

    Arguments:
        value: The forward model.
        linear: For a plain callable: whether it is linear (default: False, so only ``vjp``
            is available).
        x_shape: For a plain callable: the shape of one input.

    Raises:
        TypeError: If ``value`` is not callable.
    """
    if isinstance(value, Operator):
        return value
    if callable(getattr(value, "A", None)):
        # a deepinv Physics: its __call__ adds its own noise, so the adapter calls the noiseless A
        from cleanprior.operators.adapters import DeepinvOperator

        return DeepinvOperator(value)
    return FunctionOperator(value, linear=bool(linear), x_shape=x_shape)
