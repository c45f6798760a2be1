"""Observation files: round trips, lazy reads, refusals, atomic writes, and select_items."""

import h5py
import numpy as np
import pytest
import torch

from cleanprior.data.files import (
    ObservationFileError,
    Observations,
    corrupt_dataset,
    load_observations,
    open_observations,
    save_observations,
)
from cleanprior.operators import Blur, Composition, FunctionOperator, Mask, Matrix, fft2c, gaussian_kernel
from cleanprior.operators.registry import select_items

N = 5
SUFFIXES = [".npz", ".h5"]


def images(n=N, seed=0, shape=(1, 8, 8)):
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed))


def write(path, arrays):
    """Write a file by hand, as a user would: numpy's savez, or one h5py dataset per key."""
    if path.suffix == ".npz":
        np.savez(path, **arrays)
    else:
        with h5py.File(path, "w") as file:
            for key, value in arrays.items():
                file.create_dataset(key, data=value)


def hand_written(n=4):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, 1, 8, 8)).astype(np.float32)
    mask = (rng.random((n, 1, 8, 8)) > 0.5).astype(np.float32)
    return {"y": mask * x, "noise_std": 0.01, "operator": "mask", "mask": mask, "shape": np.array([1, 8, 8]), "x": x}


CASES = {
    "mask": (lambda: images(), {"missing": 0.5}),
    "matrix": (lambda: images(), {"m": 6}),
    "blur": (lambda: images(), {"kernel_std": 1.0}),
    "downsample": (lambda: images(), {"factor": 2}),
    "fourier": (lambda: images(), {"acceleration": 2}),
    "fourier-complex": (lambda: torch.randn(N, 8, 8, dtype=torch.complex64, generator=torch.Generator().manual_seed(1)), {}),
}


@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize("case", list(CASES))
def test_round_trip(tmp_path, case, suffix):
    make, options = CASES[case]
    x = make()
    # Per-item levels for the matrix case, one float elsewhere: both forms must survive.
    noise_std = torch.linspace(0.1, 0.5, N) if case == "matrix" else 0.1
    observations = corrupt_dataset(x, case.split("-")[0], noise_std=noise_std, generator=torch.Generator().manual_seed(2), **options)
    path = save_observations(tmp_path / f"obs{suffix}", observations)
    loaded = load_observations(path)
    assert torch.equal(loaded.y, observations.y) and loaded.y.dtype == observations.y.dtype
    assert torch.equal(loaded.x, observations.x)
    if isinstance(noise_std, float):
        assert loaded.noise_std == noise_std
    else:
        assert torch.equal(loaded.noise_std, noise_std)
    assert loaded.shape == tuple(x.shape[1:]) and loaded.noise == "gaussian"
    assert torch.equal(loaded.operator(x), observations.operator(x))

    with open_observations(path) as reader:
        assert len(reader) == N and reader.shape == tuple(x.shape[1:]) and reader.operator_name == case.split("-")[0]
        for index in (torch.tensor([3, 0, 0, 4]), [4, 1], slice(1, None, 2), torch.arange(N) % 2 == 0):
            part, expected = reader.read(index), loaded.subset(index)
            assert torch.equal(part.y, expected.y) and torch.equal(part.x, expected.x)
            assert torch.equal(part.operator(part.x), expected.operator(expected.x))
            if isinstance(noise_std, torch.Tensor):
                assert torch.equal(part.noise_std, expected.noise_std)


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_reader_reads_only_the_rows_asked(tmp_path, suffix):
    arrays = hand_written()
    arrays["y"][3, 0, 0, :2] = np.nan
    path = tmp_path / f"obs{suffix}"
    write(path, arrays)
    with open_observations(path) as reader:
        assert torch.equal(reader.read([0, 2]).y, torch.from_numpy(arrays["y"][[0, 2]]))
        with pytest.raises(ObservationFileError, match="y contains 2 NaN"):
            reader.read([1, 3])
    with pytest.raises(ObservationFileError, match="y contains 2 NaN"):
        load_observations(path)


def test_load_to_device(tmp_path, device):
    x = images()
    observations = corrupt_dataset(x, "mask", noise_std=0.0, generator=torch.Generator().manual_seed(0))
    loaded = load_observations(save_observations(tmp_path / "obs.npz", observations), device=device)
    assert loaded.y.device.type == device.type
    assert torch.equal(loaded.operator(x.to(device)).cpu(), observations.y)



def tensors_of(value, seen=None):
    """Every tensor reachable from observations or an operator (fields, buffers, attributes, parts)."""
    seen = set() if seen is None else seen
    if id(value) in seen:
        return
    seen.add(id(value))
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from tensors_of(item, seen)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from tensors_of(item, seen)
    elif isinstance(value, (torch.nn.Module, Observations)):
        yield from tensors_of(vars(value), seen)


@pytest.mark.parametrize("operator, options", [("mask", {}), ("matrix", {"m": 10}), ("blur", {"kernel_size": 5}), ("fourier", {})])
def test_to_moves_every_tensor(operator, options):
    """``.to(dtype)`` runs the code path of ``.to(device)``: y, x, noise_std and every operator tensor."""
    x = images(n=4)
    observations = corrupt_dataset(x, operator, noise_std=0.05, generator=torch.Generator().manual_seed(0), **options)
    observations = Observations(observations.y, observations.operator, torch.full((4,), 0.05), observations.shape,
                                x=observations.x)
    before = [t.clone() for t in tensors_of(observations)]
    moved = observations.to(torch.float64)
    floating = [t for t in tensors_of(moved) if t.is_floating_point() or t.is_complex()]
    assert len(floating) >= 4
    assert all(t.dtype in (torch.float64, torch.complex128) for t in floating), [t.dtype for t in floating]
    assert all(torch.equal(a, b) for a, b in zip(before, tensors_of(observations)))  # the original stays
    assert torch.allclose(moved.operator(x.double()), observations.operator(x).to(moved.y.dtype), atol=1e-5)
    back = moved.to(device="cpu", dtype=torch.float32)
    assert all(t.dtype in (torch.float32, torch.complex64) for t in tensors_of(back) if t.is_floating_point() or t.is_complex())

REFUSALS = {
    "missing y": ({"y": None}, "'y'"),
    "missing operator": ({"operator": None}, "'operator'"),
    "missing shape": ({"shape": None}, "'shape'"),
    "missing noise_std": ({"noise_std": None}, "'noise_std'"),
    "missing parameter": ({"mask": None}, "'mask'"),
    "unknown operator": ({"operator": "blurr"}, "'blurr'.*known operators: .*mask"),
    "nested operator": ({"operator": "compose", "mask": None}, "'compose'.*not supported in files"),
    "unknown key": ({"nosie_std": 0.1}, "'nosie_std'.*allowed.*noise_std"),
    "unknown noise": ({"noise": "poison"}, "'poison'.*gaussian"),
    "nan y": ({"y": "nan"}, "y contains 3 NaN"),
    "inf x": ({"x": "nan"}, "x contains 3 NaN"),
    "nan mask": ({"mask": "nan"}, "mask contains 3 NaN"),
    "nan noise_std": ({"noise_std": np.array([0.1, np.nan, 0.1, 0.1])}, "noise_std contains 1 NaN"),
    "negative noise_std": ({"noise_std": -0.1}, "noise_std must be >= 0"),
    "noise_std items": ({"noise_std": np.ones(3)}, "noise_std has 3 items but y has 4"),
    "mask items": ({"mask": "short"}, "mask has 3 items but y has 4"),
    "x items": ({"x": "short"}, "x has 3 items but y has 4"),
    "x shape": ({"x": "narrow"}, r"x has shape \(4, 1, 8, 7\) but shape says \(1, 8, 8\)"),
    "y shape": ({"y": "narrow"}, r"operator 'mask' maps \(1, 8, 8\) to \(1, 8, 8\) but y items have shape \(1, 8, 7\)"),
    "float shape": ({"shape": np.array([1.0, 8.0, 8.0])}, "shape must be .* integers"),
    "operator not a string": ({"operator": np.arange(3)}, "operator must be a string"),
}


@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize("refusal", list(REFUSALS))
def test_refusals_name_the_file_and_the_key(tmp_path, refusal, suffix):
    changes, message = REFUSALS[refusal]
    arrays = hand_written()
    for key, change in changes.items():
        if change is None:
            del arrays[key]
        elif isinstance(change, str) and key in ("y", "x", "mask") and change in ("nan", "short", "narrow"):
            value = arrays[key].copy()
            if change == "nan":
                value.reshape(-1)[[1, 70, 200]] = np.nan if key != "x" else np.inf
            arrays[key] = {"nan": value, "short": value[:3], "narrow": value[..., :7]}[change]
        else:
            arrays[key] = change
    path = tmp_path / f"bad{suffix}"
    write(path, arrays)
    with pytest.raises(ObservationFileError, match=message) as error:
        load_observations(path)
    assert str(path) in str(error.value)


def test_unreadable_files(tmp_path):
    with pytest.raises(ObservationFileError, match="no such file"):
        load_observations(tmp_path / "missing.npz")
    (tmp_path / "obs.txt").write_text("y")
    with pytest.raises(ObservationFileError, match=r"unknown suffix '\.txt'"):
        load_observations(tmp_path / "obs.txt")
    for suffix in SUFFIXES:
        good = tmp_path / f"good{suffix}"
        write(good, hand_written())
        data = good.read_bytes()
        truncated = tmp_path / f"truncated{suffix}"
        truncated.write_bytes(data[: len(data) // 2])
        with pytest.raises(ObservationFileError, match="truncated"):
            load_observations(truncated)


def test_in_memory_refusals():
    x = images()
    A = Mask(torch.ones(N, 1, 8, 8))
    with pytest.raises(ValueError, match="x has 4 items but y has 5"):
        Observations(y=x, operator=A, noise_std=0.1, shape=(1, 8, 8), x=x[:4])
    with pytest.raises(ValueError, match="noise_std must be >= 0"):
        Observations(y=x, operator=A, noise_std=-1.0, shape=(1, 8, 8))
    with pytest.raises(ValueError, match="mask has 4 items but y has 5"):
        Observations(y=x, operator=Mask(torch.ones(4, 1, 8, 8)), noise_std=0.1, shape=(1, 8, 8))
    with pytest.raises(ValueError, match=r"maps \(1, 8, 8\) to \(4,\)"):
        Observations(y=x, operator=Matrix(torch.ones(4, 64), x_shape=(1, 8, 8)), noise_std=0.1, shape=(1, 8, 8))


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_failed_save_leaves_the_old_file(tmp_path, suffix, monkeypatch):
    path = tmp_path / f"obs{suffix}"
    observations = corrupt_dataset(images(), "mask", noise_std=0.1, generator=torch.Generator().manual_seed(0))
    save_observations(path, observations)
    before = path.read_bytes()

    poisoned = corrupt_dataset(images(seed=1), "mask", noise_std=0.1)
    poisoned.y[0, 0, 0, 0] = float("nan")  # after construction, so only save can catch it
    with pytest.raises(ObservationFileError, match="y contains 1 NaN"):
        save_observations(path, poisoned)
    nested = Composition(Blur(gaussian_kernel(1.0)), Mask(torch.ones(N, 1, 8, 8)))
    composed = Observations(y=images(), operator=nested, noise_std=0.1, shape=(1, 8, 8))
    with pytest.raises(ObservationFileError, match="not supported in files"):
        save_observations(path, composed)

    def failing_write(*args, **kwargs):
        if suffix == ".npz":
            args[0].write(b"PK\x03\x04 half an archive")
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", failing_write)
    monkeypatch.setattr(h5py.Group, "create_dataset", failing_write)
    with pytest.raises(OSError, match="disk full"):
        save_observations(path, corrupt_dataset(images(seed=2), "mask", noise_std=0.1))
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_corrupt_dataset_operators_are_exact():
    x = images(n=6)
    generator = torch.Generator().manual_seed(3)
    masked = corrupt_dataset(x, "mask", noise_std=0.0, generator=generator)
    mask = masked.operator.mask
    assert mask.shape == (6, 1, 8, 8) and ((mask == 0).sum(dim=(1, 2, 3)) == 48).all()  # 0.75 of 64
    assert torch.equal(masked.y, mask * x)

    boxed = corrupt_dataset(x, "mask", box=0.5, noise_std=0.0, generator=generator).operator.mask
    hidden = boxed == 0
    assert (hidden.sum(dim=(1, 2, 3)) == 16).all()  # a 4 x 4 box
    assert (hidden.any(dim=3).sum(dim=(1, 2)) == 4).all() and (hidden.any(dim=2).sum(dim=(1, 2)) == 4).all()

    projected = corrupt_dataset(x, "matrix", m=5, noise_std=0.0, generator=generator)
    A = projected.operator.A
    assert A.shape == (6, 5, 64) and torch.allclose(A.norm(dim=-1), torch.ones(6, 5), atol=1e-6)
    assert torch.allclose(projected.y, torch.einsum("bij,bj->bi", A, x.flatten(1)), atol=1e-5)

    blurred = corrupt_dataset(x, "blur", kernel_std=1.0, noise_std=0.0, generator=generator)
    kernel = blurred.operator.kernel
    assert kernel.shape == (1, 7, 7) and abs(kernel.sum().item() - 1) < 1e-6  # size 2 * ceil(3) + 1

    small = corrupt_dataset(x, "downsample", noise_std=0.0, generator=generator)
    assert torch.allclose(small.y, x.reshape(6, 1, 4, 2, 4, 2).mean(dim=(3, 5)), atol=1e-6)

    mri = corrupt_dataset(x, "fourier", acceleration=4, noise_std=0.0, generator=generator)
    columns = mri.operator.mask
    # round(0.08 * 8) = 1 centre column at 8 // 2, round(8 / 4) = 2 columns in all
    assert columns.shape == (6, 8) and (columns.sum(1) == 2).all() and (columns[:, 4] == 1).all()
    assert mri.y.is_complex() and torch.allclose(mri.y, columns[:, None, :] * fft2c(x[:, 0].to(torch.complex64)), atol=1e-5)

    again = corrupt_dataset(x, "mask", noise_std=0.0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(again.operator.mask, mask)


def test_corrupt_dataset_noise_level():
    x = images(n=64)
    std = torch.cat((torch.full((32,), 0.1), torch.full((32,), 1.0)))
    noisy = corrupt_dataset(x, "identity", noise_std=std, generator=torch.Generator().manual_seed(4))
    residual = noisy.y - x
    # 2048 draws per half: the sample std has a relative standard error of 1/sqrt(4096) = 1.6%;
    # 8% is five of them.
    for half, level in ((residual[:32], 0.1), (residual[32:], 1.0)):
        assert abs(half.std().item() / level - 1) < 0.08
    assert torch.equal(noisy.noise_std, std)


def test_corrupt_dataset_refuses_bad_options():
    x = images()
    with pytest.raises(ValueError, match="kernel_std"):
        corrupt_dataset(x, "mask", noise_std=0.1, kernel_std=2.0)
    with pytest.raises(ValueError, match="'m'"):
        corrupt_dataset(x, "matrix", noise_std=0.1)
    with pytest.raises(ValueError, match="either 'missing'.*or 'box'"):
        corrupt_dataset(x, "mask", noise_std=0.1, missing=0.5, box=0.5)
    with pytest.raises(ValueError, match="'tomography'"):
        corrupt_dataset(x, "tomography", noise_std=0.1)
    with pytest.raises(ValueError, match="noise_std must be >= 0"):
        corrupt_dataset(x, "identity", noise_std=-0.1)


def test_subset_split_and_to():
    x = images(n=10)
    std = torch.arange(1, 11, dtype=torch.float32) / 10
    observations = corrupt_dataset(x, "matrix", m=3, noise_std=std, generator=torch.Generator().manual_seed(5))
    part = observations.subset([7, 2])
    assert torch.equal(part.noise_std, std[[7, 2]]) and torch.equal(part.x, x[[7, 2]])
    assert torch.equal(part.operator.A, observations.operator.A[[7, 2]])
    with pytest.raises(IndexError, match="outside"):
        observations.subset([10])

    kept, held = observations.split(0.3, generator=torch.Generator().manual_seed(6))
    assert (len(kept), len(held)) == (7, 3)
    together = torch.cat((kept.noise_std, held.noise_std)).sort().values
    assert torch.equal(together, std)  # disjoint, and all ten items
    again, _ = observations.split(0.3, generator=torch.Generator().manual_seed(6))
    assert torch.equal(again.y, kept.y)
    with pytest.raises(ValueError, match="non-empty"):
        observations.split(0.01)

    moved = observations.to("cpu")
    assert moved.operator is not observations.operator and torch.equal(moved.operator(x), observations.operator(x))


def test_select_items():
    x = images(n=6)
    index = torch.tensor([5, 0, 0, 3])
    generator = torch.Generator().manual_seed(7)
    masks = (torch.rand(6, 1, 8, 8, generator=generator) > 0.5).float()
    for A in (Mask(masks), Matrix(torch.randn(6, 4, 64, generator=generator), x_shape=(1, 8, 8))):
        assert torch.equal(select_items(A, index, 6)(x[index]), A(x)[index])
        assert torch.equal(select_items(A, slice(1, 4), 6)(x[1:4]), A(x)[1:4])

    shared = Blur(gaussian_kernel(1.0))
    assert select_items(shared, index, 6).kernel is shared.kernel
    nested = Composition(shared, Mask(torch.ones(6, 1, 8, 8)))
    kept = select_items(nested, index, 6)
    assert kept.inner.mask.shape[0] == 4 and kept.outer.kernel is shared.kernel
    plain = FunctionOperator(lambda v: 2 * v)
    assert select_items(plain, index, 6) is plain


def test_hand_written_example_in_the_docstring(tmp_path):
    rng = np.random.default_rng(8)
    x = rng.standard_normal((3, 1, 28, 28)).astype(np.float32)
    mask = (rng.random((3, 1, 28, 28)) > 0.75).astype(np.float32)
    y = mask * x + 0.01 * rng.standard_normal((3, 1, 28, 28)).astype(np.float32)
    np.savez(tmp_path / "observations.npz", y=y, noise_std=0.01, operator="mask", mask=mask, shape=[1, 28, 28])
    observations = load_observations(tmp_path / "observations.npz")
    assert len(observations) == 3 and observations.x is None and observations.noise_std == 0.01
    assert torch.equal(observations.y, torch.from_numpy(y))
    assert torch.equal(observations.operator(torch.from_numpy(x)), torch.from_numpy(mask * x))


def test_numpy_layouts(tmp_path):
    """Compressed archives (read whole), Fortran-order and big-endian members read alike."""
    arrays = hand_written()
    np.savez(tmp_path / "plain.npz", **arrays)
    np.savez_compressed(tmp_path / "compressed.npz", **arrays)
    np.savez(tmp_path / "odd.npz", **{**arrays, "y": arrays["y"].astype(">f4"), "mask": np.asfortranarray(arrays["mask"])})
    expected = load_observations(tmp_path / "plain.npz")
    for name in ("compressed.npz", "odd.npz"):
        loaded = load_observations(tmp_path / name)
        assert torch.equal(loaded.y, expected.y) and torch.equal(loaded.operator.mask, expected.operator.mask)
