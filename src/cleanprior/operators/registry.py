"""Operators by name: ``operator("mask", mask=...)``, and their parameters for saving.

Observation files store an operator as its name and its (per-item) parameters; this registry turns
them back into an operator. A class joins it with the :func:`register` decorator.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from torch import Tensor

from cleanprior.operators.base import Operator

__all__ = ["OPERATORS", "register", "operator", "from_parameters", "repeat_items", "select_items"]

OPERATORS: dict[str, type[Operator]] = {}

T = TypeVar("T", bound=type[Operator])


def register(name: str) -> Callable[[T], T]:
    """Class decorator: make an operator class constructible by ``name``."""

    def decorate(cls: T) -> T:
        if name in OPERATORS and OPERATORS[name] is not cls:
            raise ValueError(f"an operator named {name!r} is already registered")
        cls.name = name
        OPERATORS[name] = cls
        return cls

    return decorate


def operator(name: str, **parameters: Any) -> Operator:
    """Build an operator by name.

    Arguments:
        name: ``"identity"``, ``"mask"``, ``"matrix"``, ``"blur"``, ``"downsample"``,
            ``"fourier"``, ``"tomography"``, ``"phase"``... (``OPERATORS`` lists them).
        parameters: The operator's parameters; per-item ones carry a leading batch dimension.

    Raises:
        ValueError: For an unknown name, or parameters the operator refuses (named).
    """
    import cleanprior.operators  # noqa: F401  (registers the built-in operators)

    if name not in OPERATORS:
        raise ValueError(f"unknown operator {name!r}; known operators: {', '.join(sorted(OPERATORS))}")
    try:
        return OPERATORS[name](**parameters)
    except TypeError as error:
        raise ValueError(f"operator {name!r}: {error}") from None


def from_parameters(parameters: dict[str, Any]) -> Operator:
    """Rebuild an operator from :meth:`Operator.parameters_dict` output."""
    parameters = dict(parameters)
    if "name" not in parameters:
        raise ValueError("operator parameters lack the operator's 'name'")
    return operator(str(parameters.pop("name")), **parameters)


def repeat_items(A: Operator, repeats: int, batch: int) -> Operator:
    """The operator for a batch whose every observation is repeated ``repeats`` times in a row.

    Per-item parameters (tensors whose leading dimension is ``batch``, at any nesting depth) are
    repeated with ``repeat_interleave``, matching ``y.repeat_interleave(repeats, 0)``; shared
    parameters are kept. Operators that cannot be rebuilt by name (a plain callable, a network)
    carry no per-item parameters and are returned as they are.

    Arguments:
        A: The operator of ``batch`` observations.
        repeats: How many times each observation is repeated.
        batch: The number of observations ``A`` was built for.
    """
    return _map_items(A, batch, lambda value: value.repeat_interleave(repeats, 0))


def select_items(A: Operator, index: slice | Tensor, batch: int) -> Operator:
    """The operator for a subset of the observations, ``y[index]``.

    Per-item parameters (tensors whose leading dimension is ``batch``, at any nesting depth) are
    indexed along that dimension, so that ``select_items(A, index, batch)(x[index])`` equals
    ``A(x)[index]``; shared parameters are kept. Operators that cannot be rebuilt by name (a plain
    callable, a network) carry no per-item parameters and are returned as they are.

    Arguments:
        A: The operator of ``batch`` observations.
        index: The observations to keep: a slice or an integer tensor of shape ``(n,)``
            (repeats and any order allowed).
        batch: The number of observations ``A`` was built for.
    """
    return _map_items(A, batch, lambda value: value[index])


def _map_items(A: Operator, batch: int, transform: Callable[[Any], Any]) -> Operator:
    """Rebuild ``A`` with ``transform`` applied to every per-item parameter tensor."""
    try:
        parameters = A.parameters_dict()
    except NotImplementedError:
        return A

    def visit(value: Any) -> Any:
        if isinstance(value, Tensor):
            # With one observation, a leading dimension of 1 is indistinguishable from a shared
            # parameter, and a shared parameter broadcasts to any selection anyway.
            per_item = value.ndim > 0 and value.shape[0] == batch and batch > 1
            return transform(value) if per_item else value
        if isinstance(value, dict):
            return {k: visit(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(visit(v) for v in value)
        return value

    return from_parameters(visit(parameters))
