"""One contract for every operator: adjoint identity, Gram product, pseudo-inverse identities,
per-item parameters, shapes, dtypes, devices and a save/load round trip.

Cases live in ``tests/cases/operators_*.py``: each module defines ``CASES``, a dict from a case name
to a factory ``make(batch, generator) -> (operator, x_shape, x_dtype)`` building an operator in
float64 with per-item parameters for ``batch`` observations. Every registered operator must have a
case, so no operator escapes the contract.
"""

import importlib
import pathlib

import pytest
import torch

from cleanprior.operators import OPERATORS, FunctionOperator, LinearOperator, from_parameters
from cleanprior.operators.base import inner, matching_dtype

CASES = {}
for path in sorted((pathlib.Path(__file__).parent / "cases").glob("operators_*.py")):
    module = importlib.import_module(f"cases.{path.stem}")
    CASES.update(module.CASES)

LINEAR = {name: make for name, make in CASES.items() if name.split("[")[0] not in ("phase", "network")}
B = 3
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def build(name, device="cpu"):
    operator, x_shape, x_dtype = CASES[name](B, torch.Generator().manual_seed(0))
    return operator.to(device), x_shape, x_dtype


def random(shape, dtype, seed, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    if dtype.is_complex:
        real = torch.randn(shape, generator=g, dtype=torch.float64)
        return torch.complex(real, torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype).to(device)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).to(device)


def test_every_registered_operator_has_a_case():
    names = {name.split("[")[0] for name in CASES}
    assert set(OPERATORS) <= names, f"operators without a contract case: {sorted(set(OPERATORS) - names)}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(LINEAR))
def test_adjoint_identity(name, device):
    A, x_shape, x_dtype = build(name, device)
    x = random((B, *x_shape), x_dtype, 1, device)
    Ax = A(x)
    y = random(Ax.shape, Ax.dtype, 2, device)
    ATy = A.adjoint(y)
    assert ATy.shape == x.shape and ATy.dtype == x.dtype and ATy.device == x.device
    lhs, rhs = inner(Ax, y), inner(x, ATy)
    scale = (Ax.abs().reshape(B, -1).norm(dim=1) * y.abs().reshape(B, -1).norm(dim=1))
    assert ((lhs - rhs).abs() <= 1e-12 * scale).all(), (lhs, rhs)


@pytest.mark.parametrize("name", sorted(LINEAR))
def test_gram_matches_two_products(name):
    A, x_shape, x_dtype = build(name)
    x = random((B, *x_shape), x_dtype, 3)
    assert torch.allclose(A.gram(x), A.adjoint(A(x)), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", sorted(LINEAR))
def test_pseudo_inverse_identities(name):
    A, x_shape, x_dtype = build(name)
    if not A.has_pinv:
        with pytest.raises(NotImplementedError):
            A.pinv(A(random((B, *x_shape), x_dtype, 4)))
        return
    x = random((B, *x_shape), x_dtype, 4)
    Ax = A(x)
    y = random(Ax.shape, Ax.dtype, 5)
    assert torch.allclose(A(A.pinv(Ax)), Ax, rtol=1e-8, atol=1e-10)  # A A+ A = A
    assert torch.allclose(A.pinv(A(A.pinv(y))), A.pinv(y), rtol=1e-8, atol=1e-10)  # A+ A A+ = A+


@pytest.mark.parametrize("name", sorted(LINEAR))
def test_autograd_adjoint_of_the_same_map_is_exact(name):
    A, x_shape, x_dtype = build(name)
    x = random((B, *x_shape), x_dtype, 6)
    y = random(A(x).shape, A(x).dtype, 7)
    wrapped = FunctionOperator(A.forward, linear=True, x_shape=x_shape)
    wrapped(x)
    assert torch.allclose(wrapped.adjoint(y), A.adjoint(y), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", sorted(CASES))
def test_float32_and_batch_preserved(name):
    A, x_shape, x_dtype = build(name)
    x = random((B, *x_shape), x_dtype, 8)
    A32 = A.to(torch.float32) if not x_dtype.is_complex else A.to(torch.complex64)
    x32 = x.to(torch.complex64 if x_dtype.is_complex else torch.float32)
    y32 = A32(x32)
    assert y32.shape[0] == B
    assert y32.dtype in (torch.float32, torch.complex64)
    assert torch.allclose(y32.to(A(x).dtype), A(x), rtol=1e-4, atol=1e-4)



def reachable_tensors(value, path="op", seen=None):
    """Every tensor reachable from ``value``: attributes, buffers, parameters, submodules, containers."""
    seen = set() if seen is None else seen
    if id(value) in seen:
        return
    seen.add(id(value))
    if isinstance(value, torch.Tensor):
        yield path, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from reachable_tensors(item, f"{path}[{key!r}]", seen)
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from reachable_tensors(item, f"{path}[{i}]", seen)
    elif isinstance(value, torch.nn.Module):
        for key, item in vars(value).items():
            yield from reachable_tensors(item, f"{path}.{key}", seen)


def assert_precision(A, dtype):
    for path, t in reachable_tensors(A):
        if t.is_floating_point() or t.is_complex():
            expected = dtype.to_complex() if t.is_complex() else dtype
            assert t.dtype == expected, f"{path} is {t.dtype} after .to({dtype})"


@pytest.mark.parametrize("name", sorted(CASES))
def test_to_moves_every_tensor(name):
    """``.to(dtype)`` runs the code path of ``.to(device)``: every tensor reachable from the
    operator, its parts' included, converts, caches built before the move too, and it still works."""
    A, x_shape, x_dtype = build(name)
    x = random((B, *x_shape), x_dtype, 12)
    y = A(x)
    if A.linear:
        ATy = A.adjoint(y)  # fills the caches (projection matrices, pseudo-inverses) that must follow
        if A.has_pinv:
            A.pinv(y)
    moved = A.to(torch.float32)
    assert moved is A
    assert_precision(moved, torch.float32)
    x32 = x.to(matching_dtype(torch.float32, x))
    y32 = moved(x32)
    assert y32.dtype == matching_dtype(torch.float32, y)
    assert torch.allclose(y32.to(y.dtype), y, rtol=1e-4, atol=1e-4)
    if A.linear:
        assert torch.allclose(moved.adjoint(y32).to(x.dtype), ATy, rtol=1e-4, atol=1e-4)
    back = moved.to(dtype=torch.float64)
    assert_precision(back, torch.float64)
    assert back(x).dtype == y.dtype
    assert torch.allclose(back(x), y, rtol=1e-4, atol=1e-4)

def item_parameters(value, i):
    """The parameters of observation i: every per-item tensor sliced, at any nesting depth."""
    if isinstance(value, torch.Tensor):
        return value[i : i + 1] if value.ndim > 0 and value.shape[0] == B else value
    if isinstance(value, dict):
        return {k: item_parameters(v, i) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(item_parameters(v, i) for v in value)
    return value


@pytest.mark.parametrize("name", sorted(CASES))
def test_per_item_parameters_act_item_by_item(name):
    A, x_shape, x_dtype = build(name)
    x = random((B, *x_shape), x_dtype, 9)
    y = A(x)
    parameters = A.parameters_dict()
    for i in range(B):
        item = from_parameters(item_parameters(parameters, i))
        assert torch.allclose(item(x[i : i + 1]), y[i : i + 1], rtol=1e-10, atol=1e-12)


# Convolutional operators take images of any size, so no shape is wrong for them.
SIZE_AGNOSTIC = ("identity", "blur", "downsample")


@pytest.mark.parametrize("name", sorted(n for n in LINEAR if n.split("[")[0] not in SIZE_AGNOSTIC))
def test_measurements_of_the_wrong_shape_are_refused(name):
    """The adjoint of a y that the operator cannot have produced raises a ValueError, not garbage."""
    A, x_shape, x_dtype = build(name)
    y = A(random((B, *x_shape), x_dtype, 11))
    wrong = torch.zeros((B, *y.shape[1:-1], y.shape[-1] + 1), dtype=y.dtype)
    with pytest.raises(ValueError):
        A.adjoint(wrong)
    with pytest.raises(ValueError):
        A(torch.zeros((B, *x_shape[:-1], x_shape[-1] + 1), dtype=x_dtype))


@pytest.mark.parametrize("name", sorted(CASES))
def test_save_and_load_round_trip(name, tmp_path):
    A, x_shape, x_dtype = build(name)
    torch.save(A.parameters_dict(), tmp_path / "operator.pt")
    rebuilt = from_parameters(torch.load(tmp_path / "operator.pt", weights_only=True))
    x = random((B, *x_shape), x_dtype, 10)
    assert type(rebuilt) is type(A)
    assert torch.equal(rebuilt(x), A(x))
    if isinstance(A, LinearOperator):
        y = A(x)
        assert torch.equal(rebuilt.adjoint(y), A.adjoint(y))
