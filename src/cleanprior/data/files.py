r"""Observation files: corrupted data with its forward operator and noise level, on disk.

Every learning method (and the command line) starts from :math:`N` observations
:math:`y_i = A_i(x_i) + n_i`, :math:`n_i \sim \mathcal{N}(0, \sigma_i^2 I)`. A file holds them as
flat, named arrays, in a ``.npz`` archive (uncompressed, written by ``numpy.savez``) or an HDF5
file (``.h5``/``.hdf5``, one dataset per key at the root, read with h5py) for data larger than
memory:

================  ==============================  ==========================  ========
key               shape                           dtype                       required
================  ==============================  ==========================  ========
``y``             ``(N, *y_shape)``               float or complex            yes
``noise_std``     ``()`` or ``(N,)``              float, :math:`\geq 0`       yes
``operator``      ``()``                          string: a registered name   yes
``shape``         ``(len(x_shape),)``             integer: the signal shape   yes
``noise``         ``()``                          string (``"gaussian"``)     no
``x``             ``(N, *x_shape)``               float or complex            no
*parameters*      as the operator takes them      any numeric, or string      per op.
================  ==============================  ==========================  ========

The operator is rebuilt as ``cleanprior.operator(operator, **parameters)``: its parameters are
stored under their own names, as :meth:`~cleanprior.operators.base.Operator.parameters_dict` gives
them (``mask``, ``A`` and ``x_shape``, ``kernel`` and ``padding``, ``factor``, Fourier's ``mask``,
``view`` and ``coils``, ``angles``...). Parameters the operator's constructor takes as tensors have
a leading item dimension: of length :math:`N` for one value per observation (a mask per image),
of length 1 for a value shared by all (a blur kernel); the other parameters (numbers, strings,
shapes) are stored as 0-d or 1-d arrays. ``x`` is the ground truth, used only for evaluation.
Operators whose parameters nest other operators (compositions, stacks) are not supported in files.

Every key is checked when a file is opened, and every row when it is read: a missing, misspelt or
unknown key, an unknown operator, NaN or infinite values, a negative noise level or a shape that
disagrees with the others raises :class:`ObservationFileError` naming the file and the key.

:func:`open_observations` reads rows lazily, so that an E-step can stream batches from a file
larger than memory: the members of an uncompressed ``.npz`` are memory-mapped (only the rows read
are loaded; a compressed archive is read whole), HDF5 datasets are sliced. :func:`save_observations`
writes a temporary file in the target's folder and renames it over the target, so a failed write
never leaves a half-written file.

A file written by hand, for masked images ``x`` of shape ``(N, 1, 28, 28)``::

    mask = (np.random.rand(N, 1, 28, 28) > 0.75).astype(np.float32)
    y = mask * x + 0.01 * np.random.randn(N, 1, 28, 28).astype(np.float32)
    np.savez("observations.npz", y=y, noise_std=0.01, operator="mask", mask=mask, shape=[1, 28, 28])

References:
    Rozet et al. (2024). Learning Diffusion Priors from Observations by Expectation Maximization
    (DiEM): the linear Gaussian observations :math:`y = A x + n` every method learns from.
    https://arxiv.org/abs/2405.13712
"""

from __future__ import annotations

import copy
import inspect
import math
import numbers
import os
import pathlib
import struct
import typing
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from cleanprior.operators import OPERATORS, Operator, box_mask, column_mask, corrupt, gaussian_kernel
from cleanprior.operators import random_mask, random_projection
from cleanprior.operators.base import matching_dtype
from cleanprior.operators.noise import NOISES
from cleanprior.operators.registry import operator as build_operator
from cleanprior.operators.registry import select_items
from cleanprior.runs.atomic import atomic_path

__all__ = [
    "FORMAT_KEYS",
    "CORRUPTIONS",
    "ObservationFileError",
    "ObservationReader",
    "Observations",
    "corrupt_dataset",
    "load_clean",
    "load_observations",
    "open_observations",
    "save_observations",
]

FORMAT_KEYS = ("y", "noise_std", "noise", "operator", "shape", "x")
REQUIRED_KEYS = ("y", "noise_std", "operator", "shape")
SUFFIXES = (".npz", ".h5", ".hdf5")

Index = Tensor | slice | Sequence[int] | np.ndarray


class ObservationFileError(ValueError):
    """An observation file is missing, unreadable, or does not describe consistent observations."""


def _rows(index: Index, n: int) -> Tensor | slice:
    """Validate an index of observations: a slice, or a LongTensor ``(k,)`` with values in ``[0, n)``."""
    if isinstance(index, slice):
        if len(range(n)[index]) == 0:
            raise IndexError(f"the index {index} selects none of the {n} observations")
        return index
    rows = torch.as_tensor(index).cpu()
    if rows.ndim != 1:
        raise IndexError(f"the index must be a slice or a 1-D sequence of integers, got shape {tuple(rows.shape)}")
    if rows.dtype == torch.bool:
        if rows.shape[0] != n:
            raise IndexError(f"a boolean index must have one entry per observation ({n}), got {rows.shape[0]}")
        rows = rows.nonzero().squeeze(1)
    if rows.numel() == 0:
        raise IndexError("the index selects no observations")
    if rows.is_floating_point() or rows.is_complex():
        raise IndexError(f"the index must hold integers, got {rows.dtype}")
    outside = int(((rows < -n) | (rows >= n)).sum())
    if outside:
        raise IndexError(f"the index holds {outside} values outside [-{n}, {n}) for {n} observations")
    return rows.long() % n


def _integer(value: Any) -> Any:
    """An integer entry of a shape (int, NumPy integer, 0-d integer tensor) as an ``int``; others unchanged."""
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        return value
    try:
        return value.__index__()
    except TypeError:  # a floating-point tensor has __index__ but refuses it
        return value


def _nonfinite(values: Tensor | np.ndarray) -> int:
    """The number of NaN or infinite entries (complex entries count once)."""
    if isinstance(values, np.ndarray):
        return int(values.size - np.isfinite(values).sum()) if values.dtype.kind in "fc" else 0
    if values.is_complex():
        return int((~torch.isfinite(torch.view_as_real(values)).all(-1)).sum())
    return int((~torch.isfinite(values)).sum()) if values.is_floating_point() else 0


def _check_finite(key: str, values: Tensor | np.ndarray) -> None:
    count = _nonfinite(values)
    if count:
        raise ValueError(f"{key} contains {count} NaN or infinite values")


def _tensor_leaves(value: Any, key: str = "") -> list[tuple[str, Tensor]]:
    """Every tensor in nested parameters, with its dotted key (``outer.mask``)."""
    if isinstance(value, Tensor):
        return [(key, value)]
    if isinstance(value, dict):
        return [leaf for k, v in value.items() if k != "name" for leaf in _tensor_leaves(v, f"{key}.{k}" if key else str(k))]
    if isinstance(value, (list, tuple)):
        return [leaf for i, v in enumerate(value) for leaf in _tensor_leaves(v, f"{key}[{i}]")]
    return []


def _complex_of(dtype: torch.dtype) -> torch.dtype:
    return torch.complex128 if dtype == torch.float64 else torch.complex64


def _check_maps(A: Operator, shape: tuple[int, ...], y: Tensor, x: Tensor | None) -> None:
    """Check that ``A`` (of one item) maps a signal of ``shape`` to one item of ``y``."""
    label = A.name or type(A).__name__
    # Files do not store the signals' dtype, and some operators take complex signals (Fourier's
    # complex view): without x, a real then a complex signal is tried.
    dtypes = [x.dtype] if x is not None else [y.real.dtype, _complex_of(y.real.dtype)]
    failure: Exception | None = None
    for dtype in dtypes:
        try:
            with torch.no_grad():
                out = A(torch.zeros((1, *shape), dtype=dtype, device=y.device))
            break
        except (ValueError, RuntimeError, TypeError) as error:
            failure = failure or error
    else:
        raise ValueError(f"operator {label!r} does not apply to signals of shape {shape}: {failure}")
    if tuple(out.shape[1:]) != tuple(y.shape[1:]):
        raise ValueError(f"operator {label!r} maps {shape} to {tuple(out.shape[1:])} but y items have shape {tuple(y.shape[1:])}")
    if out.is_complex() and not y.is_complex():
        raise ValueError(f"operator {label!r} gives complex measurements but y is real ({y.dtype})")


@dataclass(eq=False)
class Observations:
    r"""A set of :math:`N` observations :math:`y_i = A_i(x_i) + n_i`, validated on construction.

    Arguments:
        y: Observations, shape ``(N, *y_shape)``, real or complex, finite; :math:`N \geq 1`.
        operator: The forward model of all :math:`N` items: per-item parameters have a leading
            dimension of :math:`N`, shared ones of 1.
        noise_std: The noise level :math:`\sigma \geq 0`, a float or shape ``(N,)``.
        shape: The shape of one clean signal, ``x_shape``.
        x: The clean signals (ground truth, for evaluation only), shape ``(N, *x_shape)``, or None.
        noise: The noise model's name (a key of ``cleanprior.operators.NOISES``).

    Raises:
        ValueError: If the fields disagree (see :meth:`validate`).
    """

    y: Tensor
    operator: Operator
    noise_std: float | Tensor
    shape: tuple[int, ...]
    x: Tensor | None = None
    noise: str = "gaussian"

    def __post_init__(self) -> None:
        if isinstance(self.noise_std, Tensor) and self.noise_std.ndim == 0:
            self.noise_std = float(self.noise_std)
        elif isinstance(self.noise_std, numbers.Real) and not isinstance(self.noise_std, bool):
            self.noise_std = float(self.noise_std)
        if isinstance(self.shape, (Sequence, Tensor, np.ndarray)) and not isinstance(self.shape, str):
            self.shape = tuple(_integer(s) for s in self.shape)
        self.validate()

    def __len__(self) -> int:
        return self.y.shape[0]

    def validate(self) -> None:
        r"""Check that the fields agree.

        Checks that ``y`` and ``x`` are finite floating-point tensors with the same number
        :math:`N \geq 1` of items, ``x`` of shape ``(N, *shape)``; that ``noise_std`` is a float
        or shape ``(N,)``, non-negative and finite; that every tensor parameter of the operator is
        finite with a leading dimension of 1 or :math:`N`; and that the operator of one item maps
        a signal of ``shape`` to one item of ``y``.

        Raises:
            TypeError: If ``y``, ``x`` or ``operator`` has the wrong type.
            ValueError: For a disagreement, naming the field (``"mask has 99 items but y has 100"``).
        """
        y, x = self.y, self.x
        if not isinstance(y, Tensor):
            raise TypeError(f"y must be a tensor, got {type(y).__name__}")
        if not isinstance(self.operator, Operator):
            raise TypeError(f"operator must be an Operator (see cleanprior.operator), got {type(self.operator).__name__}")
        if not (y.is_floating_point() or y.is_complex()):
            raise ValueError(f"y must hold real or complex floating-point values, got {y.dtype}")
        if y.ndim < 1 or y.shape[0] == 0:
            raise ValueError(f"y must have shape (N, *y_shape) with N >= 1, got {tuple(y.shape)}")
        n = y.shape[0]
        if not (isinstance(self.shape, tuple) and self.shape and all(isinstance(s, int) and s > 0 for s in self.shape)):
            raise ValueError(f"shape must be a non-empty sequence of positive integers, got {self.shape!r}")
        if x is not None:
            if not isinstance(x, Tensor):
                raise TypeError(f"x must be a tensor or None, got {type(x).__name__}")
            if not (x.is_floating_point() or x.is_complex()):
                raise ValueError(f"x must hold real or complex floating-point values, got {x.dtype}")
            if x.ndim < 1 or x.shape[0] != n:
                raise ValueError(f"x has {x.shape[0] if x.ndim else 0} items but y has {n}")
            if tuple(x.shape[1:]) != self.shape:
                raise ValueError(f"x has shape {tuple(x.shape)} but shape says {self.shape}")
            if x.device != y.device:
                raise ValueError(f"x is on {x.device} but y on {y.device}")
        if self.noise not in NOISES:
            raise ValueError(f"unknown noise {self.noise!r}; known noises: {', '.join(sorted(NOISES))}")
        std = self.noise_std
        if isinstance(std, Tensor):
            if std.ndim == 1 and std.shape[0] != n:
                raise ValueError(f"noise_std has {std.shape[0]} items but y has {n}")
            if std.ndim != 1:
                raise ValueError(f"noise_std has shape {tuple(std.shape)}: give a float or one value per observation ({n},)")
            if std.is_complex():
                raise ValueError("noise_std must be real")
        elif not isinstance(std, float):
            raise TypeError(f"noise_std must be a float or a tensor of shape ({n},), got {type(std).__name__}")
        _check_finite("noise_std", torch.as_tensor(std, dtype=torch.float64))
        if (torch.as_tensor(std) < 0).any():
            raise ValueError(f"noise_std must be >= 0, got a minimum of {float(torch.as_tensor(std).min())}")
        _check_finite("y", y)
        if x is not None:
            _check_finite("x", x)
        try:
            parameters = self.operator.parameters_dict()
        except NotImplementedError:
            parameters = {}
        leaves = _tensor_leaves(parameters)
        for key, value in leaves:
            _check_finite(key, value)
            if value.ndim > 0 and value.shape[0] not in (1, n):
                raise ValueError(f"{key} has {value.shape[0]} items but y has {n}")
        per_item = n > 1 and any(value.ndim > 0 and value.shape[0] == n for _, value in leaves)
        first = select_items(self.operator, slice(0, 1), n) if per_item else self.operator
        _check_maps(first, self.shape, y[:1], None if x is None else x[:1])

    def subset(self, index: Index) -> Observations:
        """The observations ``index`` selects, in its order.

        Arguments:
            index: A slice, a LongTensor or list of integers ``(k,)`` (negative values count from
                the end; repeats allowed), or a boolean tensor ``(N,)``.

        Returns:
            The selected observations, with the operator's per-item parameters, a per-item
            ``noise_std`` and ``x`` indexed alike.

        Raises:
            IndexError: For an index out of range or that selects nothing.
        """
        n = len(self)
        rows = _rows(index, n)
        std = self.noise_std[rows] if isinstance(self.noise_std, Tensor) else self.noise_std
        return Observations(
            y=self.y[rows],
            operator=select_items(self.operator, rows, n),
            noise_std=std,
            shape=self.shape,
            x=None if self.x is None else self.x[rows],
            noise=self.noise,
        )

    def to(self, device: torch.device | str | torch.dtype | None = None, dtype: torch.dtype | None = None) -> Observations:
        """The same observations on ``device``, their floating-point values at ``dtype``'s precision.

        ``y``, ``x``, a per-item ``noise_std`` and every parameter tensor of the operator move;
        complex values stay complex (at the matching precision). ``self`` and its operator are
        left as they are. ``data.to(torch.float64)`` also works.

        Arguments:
            device: The target device (None: stay).
            dtype: The target floating-point precision (None: keep).
        """
        if isinstance(device, torch.dtype):
            device, dtype = None, device

        def convert(t: Tensor) -> Tensor:
            return t.to(device, None if dtype is None else matching_dtype(dtype, t))

        # Rebuilding the operator from views of its parameters gives a new module to move without
        # copying its (possibly large) per-item tensors first; one that cannot be rebuilt is copied.
        moved = select_items(self.operator, slice(None), len(self))
        if moved is self.operator:
            moved = copy.deepcopy(self.operator)
        return Observations(
            y=convert(self.y),
            operator=moved.to(device, dtype),
            noise_std=convert(self.noise_std) if isinstance(self.noise_std, Tensor) else self.noise_std,
            shape=self.shape,
            x=None if self.x is None else convert(self.x),
            noise=self.noise,
        )

    def split(self, fraction: float, generator: torch.Generator | None = None) -> tuple[Observations, Observations]:
        """Hold out a random fraction of the observations (e.g. for diagnostics).

        Arguments:
            fraction: The held-out fraction, in (0, 1); ``round(fraction * N)`` items are held out.
            generator: The source of the random choice.

        Returns:
            ``(kept, held_out)``, disjoint, together all :math:`N` items, each in the original order.

        Raises:
            ValueError: If either part would be empty.
        """
        n = len(self)
        held = round(fraction * n) if 0 < fraction < 1 else 0
        if not 0 < held < n:
            raise ValueError(
                f"the fraction must lie in (0, 1) and leave both parts non-empty; {fraction} of {n} observations does not"
            )
        device = generator.device if generator is not None else torch.device("cpu")
        order = torch.randperm(n, generator=generator, device=device).cpu()
        return self.subset(order[held:].sort().values), self.subset(order[:held].sort().values)


def _hints(cls: type[Operator]) -> dict[str, Any]:
    """The resolved annotations of the constructor of ``cls`` (none if they cannot be resolved)."""
    try:
        return typing.get_type_hints(cls.__init__)
    except Exception:  # annotations naming types their module does not import cannot be resolved
        return {}


def _tensor_parameters(cls: type[Operator]) -> set[str]:
    """The constructor parameters of ``cls`` that are tensors (an unannotated one counts as one)."""
    hints = _hints(cls)
    return {
        name
        for name in _constructor_parameters(cls)
        if name not in hints or hints[name] is Tensor or Tensor in typing.get_args(hints[name])
    }


def _nests(cls: type[Operator]) -> bool:
    """Whether the constructor of ``cls`` takes operators or dicts (which files cannot hold)."""

    def nested(hint: Any) -> bool:
        if hint is dict or typing.get_origin(hint) is dict or (isinstance(hint, type) and issubclass(hint, Operator)):
            return True
        return any(nested(argument) for argument in typing.get_args(hint))

    return any(nested(hint) for hint in _hints(cls).values())


def _constructor_parameters(cls: type[Operator]) -> dict[str, inspect.Parameter]:
    keyword = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {p.name: p for p in inspect.signature(cls).parameters.values() if p.kind in keyword}


def _native(array: np.ndarray) -> np.ndarray:
    """A writable, native-byte-order copy (torch takes neither read-only maps nor big-endian data)."""
    return np.array(array, dtype=array.dtype.newbyteorder("=") if array.dtype.kind in "biufc" else array.dtype)


def _python(value: np.ndarray | Any) -> Any:
    """A 0-d array as a Python scalar or string, a 1-d or larger one as (nested) lists."""
    value = np.asarray(value)
    if value.ndim > 0:
        return [_python(v) for v in value]
    item = value.item()
    return item.decode() if isinstance(item, bytes) else item


class _NpzSource:
    """The members of a ``.npz`` archive, those stored uncompressed memory-mapped."""

    def __init__(self, path: pathlib.Path) -> None:
        self.path = path
        with zipfile.ZipFile(path) as archive:
            self.members = {info.filename.removesuffix(".npy"): info for info in archive.infolist()}
        self.size = path.stat().st_size
        self.arrays: dict[str, np.ndarray] = {}

    def keys(self) -> list[str]:
        return list(self.members)

    def _map(self, key: str) -> np.ndarray:
        """The member ``key``: memory-mapped when stored uncompressed, else read whole."""
        info = self.members[key]
        if not info.filename.endswith(".npy"):
            raise ValueError(f"the member {info.filename!r} is not a .npy array")
        if info.compress_type == zipfile.ZIP_STORED:
            mapped = self._memmap(key, info)
            if mapped is not None:
                return mapped
        with zipfile.ZipFile(self.path) as archive, archive.open(info) as member:
            return np.lib.format.read_array(member, allow_pickle=False)

    def _memmap(self, key: str, info: zipfile.ZipInfo) -> np.memmap | None:
        """Map a stored member in place; None for scalars, empty arrays and newer .npy headers.

        ``np.load(..., mmap_mode="r")`` ignores the mode for archives and reads every member
        whole, so the member's data is located by hand: the zip local header (30 bytes, then the
        name and the extra field), then the .npy header.
        """
        with open(self.path, "rb") as file:
            file.seek(info.header_offset)
            header = file.read(30)
            if len(header) < 30 or header[:4] != b"PK\x03\x04":
                raise ValueError(f"{key} is damaged (no zip header at its offset)")
            name_length, extra_length = struct.unpack("<HH", header[26:30])
            file.seek(info.header_offset + 30 + name_length + extra_length)
            version = np.lib.format.read_magic(file)
            if version not in ((1, 0), (2, 0)):
                return None
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read_header(file)
            offset = file.tell()
        if dtype.hasobject:
            raise ValueError(f"{key} holds Python objects, which are not read (no pickles)")
        if len(shape) == 0 or math.prod(shape) == 0:
            return None
        if offset + dtype.itemsize * math.prod(shape) > self.size:
            raise ValueError(f"{key} is truncated: its {math.prod(shape)} values run past the end of the file")
        return np.memmap(self.path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C")

    def array(self, key: str) -> np.ndarray:
        if key not in self.arrays:
            self.arrays[key] = self._map(key)
        return self.arrays[key]

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.array(key).shape)

    def dtype(self, key: str) -> np.dtype:
        return self.array(key).dtype

    def read(self, key: str, rows: slice | np.ndarray | None = None) -> np.ndarray:
        array = self.array(key)
        return _native(array if rows is None else array[rows])

    def close(self) -> None:
        self.arrays.clear()


class _H5Source:
    """The root datasets of an HDF5 file, sliced on read."""

    def __init__(self, path: pathlib.Path) -> None:
        try:
            import h5py
        except ImportError:
            raise ObservationFileError(f"{path}: reading HDF5 files needs h5py (pip install h5py)") from None
        self.file = h5py.File(path, "r")
        self.datasets = {key: self.file[key] for key in self.file.keys()}

    def keys(self) -> list[str]:
        return list(self.datasets)

    def _dataset(self, key: str) -> Any:
        dataset = self.datasets[key]
        if not hasattr(dataset, "dtype"):
            raise ValueError(f"{key} is an HDF5 group, not a dataset")
        return dataset

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._dataset(key).shape)

    def dtype(self, key: str) -> np.dtype:
        return self._dataset(key).dtype

    def read(self, key: str, rows: slice | np.ndarray | None = None) -> np.ndarray:
        dataset = self._dataset(key)
        if rows is None:
            return _native(np.asarray(dataset[()]))
        if isinstance(rows, slice):
            return _native(dataset[rows])
        # HDF5 point selections must be increasing and unique.
        unique, inverse = np.unique(rows, return_inverse=True)
        return _native(dataset[unique])[inverse]

    def close(self) -> None:
        self.file.close()


class ObservationReader:
    """A lazily read observation file: the keys are checked on opening, the rows read on demand.

    Made by :func:`open_observations`; a context manager (closing the file on exit).

    Attributes:
        path: The file.
        shape: The shape of one clean signal.
        operator_name: The operator's registered name.
        noise: The noise model's name.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = pathlib.Path(path)
        if not self.path.is_file():
            raise ObservationFileError(f"{self.path}: no such file")
        suffix = self.path.suffix.lower()
        if suffix not in SUFFIXES:
            raise ObservationFileError(f"{self.path}: unknown suffix {suffix!r}; observation files end in {', '.join(SUFFIXES)}")
        kind = "npz" if suffix == ".npz" else "HDF5"
        try:
            self._source: _NpzSource | _H5Source = _NpzSource(self.path) if suffix == ".npz" else _H5Source(self.path)
        except ObservationFileError:
            raise
        except Exception as error:  # zipfile and h5py raise several types for a damaged file
            raise ObservationFileError(f"{self.path} is not a readable {kind} file (corrupt or truncated?): {error}") from None
        try:
            self._inspect()
        except (ValueError, KeyError) as error:
            self.close()
            raise ObservationFileError(f"{self.path}: {error}") from None
        except OSError as error:
            self.close()
            raise ObservationFileError(f"{self.path} is not a readable {kind} file (corrupt or truncated?): {error}") from None

    def _string(self, key: str) -> str:
        value = self._source.read(key)
        if value.ndim != 0 or not isinstance(_python(value), str):
            raise ValueError(f"{key} must be a string (a 0-d array), got {value.dtype} of shape {value.shape}")
        return _python(value)

    def _inspect(self) -> None:
        """Check every key against the format, reading only small and shared arrays."""
        source = self._source
        keys = source.keys()
        for key in REQUIRED_KEYS:
            if key not in keys:
                raise ValueError(f"missing the key {key!r} (required keys: {', '.join(REQUIRED_KEYS)})")
        name = self._string("operator")
        if name not in OPERATORS:
            raise ValueError(f"unknown operator {name!r} under the key 'operator'; known operators: {', '.join(sorted(OPERATORS))}")
        cls = OPERATORS[name]
        if _nests(cls):
            raise ValueError(
                f"operator {name!r} under the key 'operator' is not supported in files: its parameters nest other operators or dicts"
            )
        parameters = _constructor_parameters(cls)
        allowed = [*FORMAT_KEYS, *parameters]
        unknown = [key for key in keys if key not in allowed]
        if unknown:
            raise ValueError(
                f"unknown keys {', '.join(map(repr, unknown))}; the keys allowed with operator {name!r} are {', '.join(allowed)}"
            )
        for key, parameter in parameters.items():
            if parameter.default is inspect.Parameter.empty and key not in keys:
                raise ValueError(f"missing the key {key!r}, a parameter of operator {name!r}")
        self.operator_name = name
        self.noise = self._string("noise") if "noise" in keys else "gaussian"
        if self.noise not in NOISES:
            raise ValueError(f"unknown noise {self.noise!r} under the key 'noise'; known noises: {', '.join(sorted(NOISES))}")

        shape = source.read("shape")
        if shape.ndim != 1 or shape.size == 0 or shape.dtype.kind not in "iu" or (shape <= 0).any():
            raise ValueError(f"shape must be a non-empty 1-D array of positive integers, got {shape.dtype} {shape.tolist()}")
        self.shape = tuple(int(s) for s in shape)
        y_shape = source.shape("y")
        if len(y_shape) == 0 or y_shape[0] == 0 or source.dtype("y").kind not in "fc":
            raise ValueError(
                f"y must have shape (N, *y_shape) with N >= 1 and a float or complex dtype, got {source.dtype('y')} {y_shape}"
            )
        n = self._length = y_shape[0]
        self._has_x = "x" in keys
        if self._has_x:
            x_shape = source.shape("x")
            if len(x_shape) == 0 or x_shape[0] != n:
                raise ValueError(f"x has {x_shape[0] if x_shape else 0} items but y has {n}")
            if x_shape[1:] != self.shape:
                raise ValueError(f"x has shape {x_shape} but shape says {self.shape}")
            if source.dtype("x").kind not in "fc":
                raise ValueError(f"x must hold real or complex floating-point values, got {source.dtype('x')}")
        std = source.read("noise_std")
        if std.ndim == 1 and std.shape[0] != n:
            raise ValueError(f"noise_std has {std.shape[0]} items but y has {n}")
        if std.dtype.kind not in "iuf" or std.ndim > 1:
            raise ValueError(
                f"noise_std must be a real scalar or one value per observation ({n},), got {std.dtype} of shape {std.shape}"
            )
        _check_finite("noise_std", std)
        if (std < 0).any():
            raise ValueError(f"noise_std must be >= 0, got a minimum of {std.min()}")
        self._noise_std = float(std) if std.ndim == 0 else std.astype(np.float64 if std.dtype.kind in "iu" else std.dtype)

        tensors = _tensor_parameters(cls)
        self._per_item = [key for key in parameters if key in keys and key in tensors and n > 1 and source.shape(key)[:1] == (n,)]
        self._shared: dict[str, Any] = {}
        for key in parameters:
            if key in keys and key not in self._per_item:
                value = source.read(key)
                if value.dtype.kind not in "biufcSUO":
                    raise ValueError(f"{key} has an unsupported dtype {value.dtype}")
                _check_finite(key, value)
                self._shared[key] = torch.from_numpy(value) if key in tensors and value.dtype.kind in "biufc" else _python(value)
        if any(_nonfinite(source.read(key, slice(0, 1))) for key in self._per_item):
            return  # non-finite rows are refused, with their count, when they are read
        probe = self._operator(slice(0, 1))
        for key, value in _tensor_leaves(probe.parameters_dict()):
            if value.ndim > 0 and value.shape[0] != 1:
                raise ValueError(f"{key} has {value.shape[0]} items but y has {n}")
        x = torch.from_numpy(source.read("x", slice(0, 1))) if self._has_x else None
        _check_maps(probe, self.shape, torch.from_numpy(source.read("y", slice(0, 1))), x)

    def _operator(self, rows: slice | np.ndarray) -> Operator:
        """The operator of ``rows``, its per-item parameters read and checked."""
        per_item = {}
        for key in self._per_item:
            value = self._source.read(key, rows)
            _check_finite(key, value)
            per_item[key] = torch.from_numpy(value)
        try:
            return build_operator(self.operator_name, **self._shared, **per_item)
        except ValueError as error:
            raise ValueError(f"operator {self.operator_name!r} refuses its parameters: {error}") from None

    def __len__(self) -> int:
        return self._length

    def read(self, index: Index) -> Observations:
        """Read the observations ``index`` selects (only those rows are read from the file).

        Arguments:
            index: A slice, a LongTensor or list of integers ``(k,)``, or a boolean tensor ``(N,)``,
                as for :meth:`Observations.subset`.

        Returns:
            The observations, on the CPU, in the file's dtypes.

        Raises:
            ObservationFileError: If the rows hold NaN or infinite values (named, with their count)
                or the file cannot be read.
            IndexError: For an index out of range or that selects nothing.
        """
        selected = _rows(index, len(self))
        rows = selected if isinstance(selected, slice) else selected.numpy()
        try:
            y = self._source.read("y", rows)
            x = self._source.read("x", rows) if self._has_x else None
            std = self._noise_std if isinstance(self._noise_std, float) else torch.from_numpy(np.array(self._noise_std[rows]))
            return Observations(
                y=torch.from_numpy(y),
                operator=self._operator(rows),
                noise_std=std,
                shape=self.shape,
                x=None if x is None else torch.from_numpy(x),
                noise=self.noise,
            )
        except (ValueError, KeyError) as error:
            raise ObservationFileError(f"{self.path}: {error}") from None
        except OSError as error:
            raise ObservationFileError(f"{self.path} is not a readable file (corrupt or truncated?): {error}") from None

    def close(self) -> None:
        """Release the file."""
        self._source.close()

    def __enter__(self) -> ObservationReader:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


def open_observations(path: str | os.PathLike[str]) -> ObservationReader:
    """Open an observation file for lazy reading, checking its keys (not yet every row).

    Arguments:
        path: A ``.npz``, ``.h5`` or ``.hdf5`` file in the format of this module.

    Returns:
        A reader with ``len(reader)``, ``reader.shape``, ``reader.operator_name`` and
        ``reader.read(index)``; close it (or use it in a ``with`` block) when done.

    Raises:
        ObservationFileError: For a missing, unreadable or inconsistent file (naming the key).
    """
    return ObservationReader(path)


def load_observations(path: str | os.PathLike[str], *, device: torch.device | str = "cpu") -> Observations:
    """Read a whole observation file.

    Arguments:
        path: A ``.npz``, ``.h5`` or ``.hdf5`` file in the format of this module.
        device: Where to put the observations and the operator.

    Returns:
        The observations, in the file's dtypes.

    Raises:
        ObservationFileError: For a missing, unreadable or inconsistent file (naming the key).
    """
    with open_observations(path) as reader:
        observations = reader.read(slice(None))
    return observations if torch.device(device) == observations.y.device else observations.to(device)


def _storable(key: str, value: Any, label: str) -> np.ndarray | str:
    """An operator parameter as an array (a string stays a string, for HDF5)."""
    if isinstance(value, Tensor):
        return value.detach().cpu().resolve_conj().numpy()
    if isinstance(value, str):
        return value
    if isinstance(value, (bool, numbers.Number)):
        return np.asarray(value)
    if isinstance(value, (list, tuple)) and all(isinstance(v, (bool, numbers.Number)) for v in value):
        return np.asarray(value)
    raise ValueError(
        f"the parameter {key!r} of operator {label!r} ({type(value).__name__}) is not supported in files: "
        "operators nesting other operators cannot be saved yet"
    )


def _arrays(observations: Observations) -> dict[str, np.ndarray | str]:
    """The file's keys and arrays for ``observations`` (validated)."""
    observations.validate()
    A = observations.operator
    label = A.name or type(A).__name__
    try:
        parameters = A.parameters_dict()
    except NotImplementedError:
        raise ValueError(f"operator {label!r} cannot be rebuilt by name, so it is not supported in files") from None
    std = observations.noise_std
    arrays: dict[str, np.ndarray | str] = {
        "y": observations.y.detach().cpu().resolve_conj().numpy(),
        "noise_std": std.detach().cpu().numpy() if isinstance(std, Tensor) else np.asarray(std),
        "noise": observations.noise,
        "operator": parameters["name"],
        "shape": np.asarray(observations.shape, dtype=np.int64),
    }
    if observations.x is not None:
        arrays["x"] = observations.x.detach().cpu().resolve_conj().numpy()
    for key, value in parameters.items():
        if key == "name" or value is None:
            continue
        if key in FORMAT_KEYS:
            raise ValueError(f"the parameter {key!r} of operator {label!r} clashes with the file key of that name")
        arrays[key] = _storable(key, value, label)
    return arrays


def save_observations(path: str | os.PathLike[str], observations: Observations) -> pathlib.Path:
    """Write observations to a file, atomically.

    The observations are validated and converted first; the file is written to a temporary file in
    the same folder, flushed to disk and renamed over ``path``, so a refusal or a failed write
    leaves an existing file at ``path`` untouched.

    Arguments:
        path: The target, ending in ``.npz`` (uncompressed) or ``.h5``/``.hdf5``; its folder is
            created if needed.
        observations: The observations; their operator must be rebuildable by name, without
            nested operators.

    Returns:
        The path written.

    Raises:
        ObservationFileError: For an unknown suffix, inconsistent observations or an operator that
            files do not support (naming the key), before anything is written.
    """
    path = pathlib.Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise ObservationFileError(f"{path}: unknown suffix {suffix!r}; observation files end in {', '.join(SUFFIXES)}")
    try:
        arrays = _arrays(observations)
    except (ValueError, TypeError) as error:
        raise ObservationFileError(f"{path}: {error}") from None
    if suffix != ".npz":
        try:
            import h5py
        except ImportError:
            raise ObservationFileError(f"{path}: writing HDF5 files needs h5py (pip install h5py)") from None
    with atomic_path(path) as tmp:
        if suffix == ".npz":
            with open(tmp, "wb") as file:
                np.savez(file, **arrays)
        else:
            with h5py.File(tmp, "w") as file:
                for key, value in arrays.items():
                    file.create_dataset(key, data=value)
    return path


CORRUPTIONS: dict[str, dict[str, Any]] = {
    "identity": {},
    "mask": {"missing": 0.75, "box": None},
    "matrix": {"m": None},
    "blur": {"kernel_std": 1.5, "kernel_size": None, "padding": "circular"},
    "downsample": {"factor": 2, "method": "average"},
    "fourier": {"acceleration": 4.0, "center": 0.08, "kind": "random"},
}


def _fourier_view(x: Tensor) -> str:
    if x.is_complex() and x.ndim == 3:
        return "complex"
    if not x.is_complex() and x.ndim == 4 and x.shape[1] in (1, 2):
        return "real" if x.shape[1] == 1 else "channels"
    raise ValueError(
        f"operator 'fourier' takes x of shape (N, H, W) complex, (N, 1, H, W) or (N, 2, H, W) real; got {x.dtype} {tuple(x.shape)}"
    )


def _corruption(x: Tensor, name: str, options: dict[str, Any], generator: torch.Generator | None) -> Operator:
    """Draw the operator ``name`` for the ``N`` signals ``x``."""
    n, shape = x.shape[0], tuple(x.shape[1:])
    device = generator.device if generator is not None else x.device
    if name == "identity":
        return build_operator("identity")
    if name == "mask":
        if options["box"] is None:
            mask = random_mask(shape, options["missing"], batch=n, generator=generator, device=device)
        else:
            box = options["box"]
            if len(shape) != 3 or not 0 < box <= 1:
                raise ValueError(
                    f"box masks take images (N, C, H, W) and a side fraction 'box' in (0, 1]; got {tuple(x.shape)} and {box}"
                )
            size = (max(1, round(box * shape[1])), max(1, round(box * shape[2])))
            mask = box_mask(shape, size, batch=n, generator=generator, device=device)
        return build_operator("mask", mask=mask)
    if name == "matrix":
        if options["m"] is None:
            raise ValueError("operator 'matrix' needs the option 'm' (the number of rows)")
        A = random_projection(int(options["m"]), math.prod(shape), batch=n, generator=generator, dtype=x.real.dtype, device=device)
        return build_operator("matrix", A=A, x_shape=list(shape))
    if name == "blur":
        kernel = gaussian_kernel(options["kernel_std"], options["kernel_size"], dtype=x.real.dtype, device=device)
        return build_operator("blur", kernel=kernel[None], padding=options["padding"])
    if name == "downsample":
        return build_operator("downsample", factor=options["factor"], method=options["method"])
    view = _fourier_view(x)
    mask = column_mask(
        x.shape[-1], options["acceleration"], options["center"], kind=options["kind"], batch=n, generator=generator, device=device
    )
    return build_operator("fourier", mask=mask, view=view)


def corrupt_dataset(
    x: Tensor,
    operator: str,
    *,
    noise_std: float | Tensor,
    generator: torch.Generator | None = None,
    **options: Any,
) -> Observations:
    r"""Corrupt clean data: :math:`y_i = A_i(x_i) + \sigma_i n_i`, :math:`n_i \sim \mathcal{N}(0, I)`.

    The options of each operator (defaults in :data:`CORRUPTIONS`):

    - ``"identity"`` (denoising): none.
    - ``"mask"``: one random mask per item; ``missing`` (default 0.75), the fraction of pixels
      removed uniformly at random (for images, in every channel at once); or ``box``, the side of
      one hidden rectangle at a random position, as a fraction of the image's height and width
      (images only; not with ``missing``).
    - ``"matrix"``: one random projection per item, rows uniform on the unit sphere; ``m``, the
      number of rows (required).
    - ``"blur"``: one shared Gaussian kernel; ``kernel_std`` in pixels (1.5), ``kernel_size``
      (default :math:`2 \lceil 3 \sigma \rceil + 1`), ``padding`` (``"circular"`` or ``"zero"``).
    - ``"downsample"``: ``factor`` (2), ``method`` (``"average"`` or ``"bicubic"``).
    - ``"fourier"`` (single-coil MRI): one Cartesian column mask per item with a fully sampled
      centre; ``acceleration`` :math:`R` (4), ``center`` fraction (0.08), ``kind``
      (``"random"`` or ``"equispaced"``). The view follows ``x``: ``(N, H, W)`` complex,
      ``(N, 1, H, W)`` real or ``(N, 2, H, W)`` real and imaginary channels; ``y`` is complex
      k-space ``(N, H, W)``.

    Arguments:
        x: Clean signals, shape ``(N, *x_shape)``, finite.
        operator: The operator's name, a key of :data:`CORRUPTIONS`.
        noise_std: :math:`\sigma \geq 0`, a float or shape ``(N,)`` (all positive); 0 is noiseless.
        generator: The source of the operators' and the noise's randomness.
        **options: The operator's options, above.

    Returns:
        The observations, with ``x`` kept as the ground truth.

    Raises:
        ValueError: For an unknown operator or option (named) or an invalid ``x`` or
            ``noise_std``, before anything is drawn; for a missing or invalid option value.
    """
    if operator not in CORRUPTIONS:
        raise ValueError(f"corrupt_dataset does not draw operator {operator!r}; it draws {', '.join(CORRUPTIONS)}")
    unknown = sorted(set(options) - set(CORRUPTIONS[operator]))
    if unknown:
        known = ", ".join(CORRUPTIONS[operator]) or "none"
        raise ValueError(f"unknown options for operator {operator!r}: {', '.join(unknown)}; its options are: {known}")
    if operator == "mask" and "missing" in options and options.get("box") is not None:
        raise ValueError("operator 'mask' takes either 'missing' (random pixels) or 'box' (a hidden box), not both")
    if not isinstance(x, Tensor) or x.ndim < 2 or x.shape[0] == 0 or not (x.is_floating_point() or x.is_complex()):
        got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"x must be a floating-point tensor of shape (N, *x_shape) with N >= 1, got {got}")
    _check_finite("x", x)
    std = torch.as_tensor(noise_std, dtype=x.real.dtype, device=x.device)
    if std.ndim > 1 or (std.ndim == 1 and std.shape[0] != x.shape[0]):
        raise ValueError(f"noise_std must be a float or one value per item ({x.shape[0]},), got shape {tuple(std.shape)}")
    _check_finite("noise_std", std)
    if (std < 0).any():
        raise ValueError(f"noise_std must be >= 0, got a minimum of {float(std.min())}")
    # A float level is kept as given, not rounded through x's dtype.
    level = std if std.ndim else float(noise_std)
    A = _corruption(x, operator, {**CORRUPTIONS[operator], **options}, generator).to(x.device)
    y, A = corrupt(x, A, None if (std == 0).all() else level, generator)
    return Observations(y=y, operator=A, noise_std=level, shape=tuple(x.shape[1:]), x=x, noise="gaussian")


def load_clean(source: str, split: str = "train") -> Tensor:
    """Clean samples from an embedded dataset's name or a ``.npz`` file holding them under ``x``.

    Arguments:
        source: An embedded dataset (``cleanprior.data.DATASETS``) or a ``.npz`` path.
        split: The split of an embedded dataset (``"train"`` or ``"test"``).

    Returns:
        Samples, shape ``(N, *shape)``, float32.

    Raises:
        FileNotFoundError: If ``source`` is neither a known dataset nor an existing file.
        ValueError: If the file lacks ``x`` or holds non-finite values.
    """
    from cleanprior.data.embedded import DATASETS, load

    if source in DATASETS:
        return load(source, split)
    path = pathlib.Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"{source!r} is neither an embedded dataset ({', '.join(sorted(DATASETS))}) nor a file")
    with np.load(path) as file:
        if "x" not in file:
            raise ValueError(f"{path} holds no clean samples under the key 'x' (keys: {sorted(file.files)})")
        x = torch.as_tensor(file["x"], dtype=torch.float32)
    if x.ndim < 2:
        raise ValueError(f"{path}: 'x' must have shape (N, *shape), got {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{path}: 'x' contains NaN or infinite values")
    return x
