"""The shared training loop: a known optimum, exact resume, the moving average, refusals."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import Tensor, nn

from cleanprior.learning.loop import check_network, make_generator, train_network
from cleanprior.runs.checkpoint import load_checkpoint


@dataclasses.dataclass
class Options:
    steps: int = 400
    lr: float = 0.05
    weight_decay: float = 0.0
    clip: float = 0.0
    checkpoint_every: int = 50
    ema_decay: float = 0.0
    batch: int = 16

    def lr_factor(self, step: int) -> float:
        return 0.5 * (1 + math.cos(math.pi * step / self.steps))


def _problem(seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(64, 3, generator=g, dtype=torch.float64)
    b = a @ torch.tensor([[1.0], [-2.0], [0.5]], dtype=torch.float64)
    return a, b + 0.1 * torch.randn(64, 1, generator=g, dtype=torch.float64)


def _run(options: Options, generator: torch.Generator, **kwargs):
    a, b = _problem()
    torch.manual_seed(0)
    network = nn.Linear(3, 1, bias=False).double()

    def loss(step: int) -> dict[str, Tensor]:
        rows = torch.randint(a.shape[0], (options.batch,), generator=generator)
        residual = network(a[rows]) - b[rows]
        return {"loss": residual.pow(2).mean(), "max": residual.abs().max()}

    return train_network(
        network, loss, options, kind="lsq", generator=generator, progress=False, **kwargs
    )


def test_reaches_the_least_squares_solution() -> None:
    a, b = _problem()
    exact = torch.linalg.lstsq(a, b).solution.T
    network, history = _run(Options(steps=600), torch.Generator().manual_seed(1))
    assert torch.allclose(network.weight.detach(), exact, atol=0.02)
    assert set(history) == {"loss", "max"} and len(history["loss"]) == 600
    assert sum(history["loss"][-50:]) < 0.1 * sum(history["loss"][:50])


def test_resume_repeats_the_uninterrupted_run(tmp_path) -> None:
    whole, history = _run(Options(steps=120), torch.Generator().manual_seed(2))
    path = tmp_path / "train.pt"
    short = Options(steps=120)

    class Stop(Exception):
        pass

    def stop(step: int, loss: float) -> None:
        if step == 74:  # killed between checkpoints: steps 50 to 74 are lost and redone
            raise Stop

    with pytest.raises(Stop):
        _run(short, torch.Generator().manual_seed(2), checkpoint=path, callback=stop)
    resumed, again = _run(short, torch.Generator().manual_seed(99), checkpoint=path, resume=True)
    assert torch.equal(resumed.weight, whole.weight)
    assert again == history


def test_moving_average_follows_the_weights() -> None:
    options = Options(steps=1, ema_decay=0.9, lr=0.1)
    a, b = _problem()
    generator = torch.Generator().manual_seed(3)
    network = nn.Linear(3, 1, bias=False).double()
    before = network.weight.detach().clone()

    def loss(step: int) -> dict[str, Tensor]:
        return {"loss": (network(a) - b).pow(2).mean()}

    average, _ = train_network(
        network, loss, options, kind="lsq", generator=generator, progress=False
    )
    assert average is not network
    expected = 0.9 * before + 0.1 * network.weight.detach()
    assert torch.allclose(average.weight, expected, atol=1e-12)


def test_refuses_other_options_kind_and_metadata(tmp_path) -> None:
    path = tmp_path / "train.pt"
    _run(Options(steps=10), torch.Generator().manual_seed(0), checkpoint=path, metadata={"s": 1})
    with pytest.raises(ValueError, match=r"other options \(lr: 0.05 -> 0.01\)"):
        _run(
            Options(steps=10, lr=0.01),
            torch.Generator(),
            checkpoint=path,
            resume=True,
            metadata={"s": 1},
        )
    with pytest.raises(ValueError, match="another s"):
        _run(Options(steps=10), torch.Generator(), checkpoint=path, resume=True, metadata={"s": 2})
    network = nn.Linear(3, 1)
    with pytest.raises(ValueError, match="'lsq' checkpoint, not a 'other' one"):
        train_network(
            network,
            lambda step: {},
            Options(steps=10),
            kind="other",
            generator=torch.Generator(),
            checkpoint=path,
            resume=True,
            progress=False,
        )


def test_an_option_added_later_resumes_at_its_default(tmp_path) -> None:
    """A checkpoint written before an option existed resumes when the option has its default."""
    path = tmp_path / "train.pt"
    _run(Options(steps=10), torch.Generator().manual_seed(0), checkpoint=path)
    state = torch.load(path, weights_only=False)
    del state["metadata"]["config"]["batch"]
    torch.save(state, path)
    _, history = _run(Options(steps=10), torch.Generator(), checkpoint=path, resume=True)
    assert len(history["loss"]) == 10
    with pytest.raises(ValueError, match=r"batch: 16 -> 8"):
        _run(Options(steps=10, batch=8), torch.Generator(), checkpoint=path, resume=True)


def test_non_finite_loss_keeps_the_last_good_checkpoint(tmp_path) -> None:
    """A NaN loss at step 3 is found at the read before the checkpoint of step 4: the file keeps
    step 2's finite weights, and resuming from it goes on."""
    path = tmp_path / "train.pt"
    torch.manual_seed(0)
    network = nn.Linear(2, 1)
    poison = {3}

    def loss(step: int) -> dict[str, Tensor]:
        value = network(torch.ones(1, 2)).sum() ** 2
        return {"loss": value * (math.nan if step in poison else 1.0)}

    options = Options(steps=10, checkpoint_every=2)
    with pytest.raises(FloatingPointError, match="step 3"):
        train_network(network, loss, options, kind="nan", generator=torch.Generator(), checkpoint=path,
                      progress=False)
    assert not torch.isfinite(network.weight).all()
    state = load_checkpoint(path, keys=("training", "state_dict"))
    assert state["training"]["step"] == 2 and len(state["training"]["history"]["loss"]) == 2
    assert torch.isfinite(state["state_dict"]["weight"]).all()
    poison.clear()
    _, history = train_network(network, loss, options, kind="nan", generator=torch.Generator(), checkpoint=path,
                               resume=True, progress=False)
    assert len(history["loss"]) == 10 and all(math.isfinite(v) for v in history["loss"])


def test_checks() -> None:
    assert make_generator(None, "f").device.type == "cpu"
    with pytest.raises(ValueError, match="no parameters"):
        check_network(nn.Identity(), torch.zeros(1, 2), torch.Size([1, 2]), "net")
    with pytest.raises(
        ValueError, match=r"maps an input of shape \(2,\) to \(3,\), not to an image"
    ):
        check_network(nn.Linear(2, 3), torch.zeros(1, 2), torch.Size([1, 2]), "net", "an image")
