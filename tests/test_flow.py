"""Tests of the conditional normalizing flow: exact log-determinants, invertibility, densities."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator

import pytest
import torch
from torch import nn

from cleanprior.nn.flow import ActNorm, AffineCoupling, ConditionalFlow, InvertibleLinear, Squeeze

# (shape, condition channels): a tiny image and a tiny vector, small enough for a dense Jacobian
CASES = [((1, 4, 4), 2), ((3,), 4)]
IDS = ["image-1x4x4", "vector-3"]


@pytest.fixture(autouse=True, scope="module")
def single_thread() -> Iterator[None]:
    """Tiny networks run faster on one thread on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def build(*args, seed: int = 0, **kwargs) -> ConditionalFlow:
    """A flow whose initial weights do not depend on the global generator's state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ConditionalFlow(*args, **kwargs)


def perturb(module: nn.Module, seed: int, scale: float = 0.3) -> nn.Module:
    """Move every parameter off its (identity) initialisation, so that every term is exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


def inputs(shape, cond, batch=2, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn((batch, *shape), generator=g, dtype=dtype)
    c = torch.randn((batch, cond, *shape[1:]), generator=g, dtype=dtype)
    return z, c


def brute_logdet(f, h: torch.Tensor) -> torch.Tensor:
    """log |det J| of ``f`` at each item of ``h``, from the dense autograd Jacobian (one item at a time)."""
    values = []
    for item in h:
        J = torch.autograd.functional.jacobian(lambda v: f(v[None])[0].flatten(), item, vectorize=True)
        values.append(torch.linalg.slogdet(J.reshape(J.shape[0], -1))[1])
    return torch.stack(values)


@pytest.mark.parametrize("shape, cond", CASES, ids=IDS)
def test_flow_log_determinant_equals_the_jacobian(shape, cond):
    flow = perturb(build(shape, cond, hidden=8, layers=3, checkerboard=2, blocks=1, base_scale=0.7), 0, 0.1).double()
    z, c = inputs(shape, cond)
    x, logdet = flow(z, c)
    expected = torch.cat([brute_logdet(lambda v, i=i: flow(v, c[i:i + 1])[0], z[i:i + 1]) for i in range(z.shape[0])])
    # float64 round-off, amplified by the condition number of J in the dense log-determinant
    torch.testing.assert_close(logdet, expected, rtol=1e-9, atol=1e-9)
    # and the inverse's is its negative, at the image point
    _, inverse_logdet = flow.inverse(x, c)
    torch.testing.assert_close(inverse_logdet, -expected, rtol=1e-9, atol=1e-9)


def layer_cases() -> list:
    """Every layer kind, on one sample shape each, with the condition channels it sees."""
    image, vector = (4, 2, 2), (3,)
    checker = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).expand(image)
    halves = torch.cat([torch.ones(2, 2, 2), torch.zeros(2, 2, 2)])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        layers = [
            ("actnorm-image", ActNorm(4), image),
            ("actnorm-vector", ActNorm(3), vector),
            ("lu-image", InvertibleLinear(4), image),
            ("lu-vector", InvertibleLinear(3), vector),
            ("coupling-checkerboard", AffineCoupling(checker, 2, 8, 1, 2.0), image),
            ("coupling-channels", AffineCoupling(halves, 2, 8, 1, 2.0), image),
            ("coupling-vector", AffineCoupling(torch.tensor([1.0, 0.0, 1.0]), 2, 8, 1, 2.0), vector),
            ("depth-to-space", Squeeze(), image),
        ]
    return [pytest.param(layer, shape, id=name) for name, layer, shape in layers]


@pytest.mark.parametrize("layer, shape", layer_cases())
def test_each_layer_log_determinant_and_inverse(layer, shape):
    layer = perturb(layer, 1).double()
    h, c = inputs(shape, 2, seed=2)
    out, logdet = layer(h, c)
    expected = torch.cat([brute_logdet(lambda v, i=i: layer(v, c[i:i + 1])[0], h[i:i + 1]) for i in range(h.shape[0])])
    torch.testing.assert_close(logdet, expected, rtol=1e-9, atol=1e-9)
    back, inverse_logdet = layer.inverse(out, c)
    torch.testing.assert_close(back, h, rtol=0, atol=1e-12)
    torch.testing.assert_close(inverse_logdet, -logdet, rtol=0, atol=1e-12)


def test_inverse_undoes_forward_on_mnist_sized_images():
    flow = perturb(build((1, 28, 28), 2, hidden=8, layers=2, checkerboard=2, blocks=1), 3, scale=0.1)
    z, c = inputs((1, 28, 28), 2, batch=2, dtype=torch.float32)
    with torch.no_grad():
        x, logdet = flow(z, c)
        back, inverse_logdet = flow.inverse(x, c)
    assert (back - z).abs().max() < 1e-5
    assert (logdet + inverse_logdet).abs().max() < 1e-3 * logdet.abs().max().clamp_min(1)


@pytest.mark.parametrize("shape, cond", CASES, ids=IDS)
def test_log_prob_of_a_sample_is_the_returned_log_q(shape, cond):
    flow = perturb(build(shape, cond, hidden=8, layers=2, checkerboard=1, blocks=1), 4).double()
    _, c = inputs(shape, cond, batch=5)
    x, log_q = flow.sample(c, torch.Generator().manual_seed(0))
    torch.testing.assert_close(flow.log_prob(x, c), log_q, rtol=0, atol=1e-10)
    again, _ = flow.sample(c, torch.Generator().manual_seed(0))
    assert torch.equal(x, again)
    # a condition of another dtype is cast to the flow's
    x32, log_q32 = flow.float().sample(c, torch.Generator().manual_seed(0))
    assert x32.dtype == log_q32.dtype == torch.float32
    torch.testing.assert_close(flow.log_prob(x32, c.float()), log_q32, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape, cond", CASES, ids=IDS)
def test_untrained_flow_is_the_base_scale_times_the_identity(shape, cond):
    scale = 0.5
    flow = build(shape, cond, hidden=8, layers=3, checkerboard=2, base_scale=scale)
    z, c = inputs(shape, cond, dtype=torch.float32)
    x, logdet = flow(z, c)
    d = math.prod(shape)
    torch.testing.assert_close(x, scale * z, rtol=1e-6, atol=0)
    torch.testing.assert_close(logdet, torch.full((2,), d * math.log(scale)), rtol=1e-6, atol=0)
    # so q(x | c) is N(0, scale^2 I) whatever c
    log_normal = -0.5 * (x.flatten(1) ** 2).sum(1) / scale**2 - d * math.log(scale) - 0.5 * d * math.log(2 * math.pi)
    torch.testing.assert_close(flow.log_prob(x, c), log_normal, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape, cond", CASES, ids=IDS)
def test_samples_are_reparameterised(shape, cond):
    flow = build(shape, cond, hidden=8, layers=2, checkerboard=1)
    _, c = inputs(shape, cond, dtype=torch.float32)
    x, log_q = flow.sample(c, torch.Generator().manual_seed(0))
    (x.sum() + log_q.sum()).backward()
    # the zero-initialised last layer of a conditioner is the first to receive a gradient
    last = flow.coarse[-1].conditioner[-1]
    assert last.weight.grad is not None and last.weight.grad.abs().sum() > 0
    assert flow.log_base_scale.grad.abs().sum() > 0


def test_config_rebuilds_the_flow():
    flow = perturb(build((2, 4, 6), 3, hidden=8, layers=2, checkerboard=1, invertible_linear=False,
                                   learn_base_scale=False), 5)
    rebuilt = ConditionalFlow(**json.loads(json.dumps(flow.config)))
    rebuilt.load_state_dict(flow.state_dict())
    z, c = inputs((2, 4, 6), 3, dtype=torch.float32)
    assert torch.equal(rebuilt(z, c)[0], flow(z, c)[0])
    assert not any(name == "log_base_scale" for name, _ in flow.named_parameters())


def test_bad_shapes_raise_clear_errors():
    flow = build((1, 4, 4), 2, hidden=8, layers=1, checkerboard=1)
    z, c = inputs((1, 4, 4), 2, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"z must have shape \(B, 1, 4, 4\)"):
        flow(z[:, :, :2], c)
    with pytest.raises(ValueError, match="condition c must have shape"):
        flow(z, c[:, :1])
    with pytest.raises(ValueError, match="condition c must have shape"):
        flow.inverse(z, c[:1])
    with pytest.raises(ValueError, match="condition c must have shape"):
        flow.sample(torch.zeros(2, 3, 4, 4))
    with pytest.raises(ValueError, match="must be even"):
        ConditionalFlow((1, 5, 4), 2)
    with pytest.raises(ValueError, match="d >= 2"):
        ConditionalFlow((1,), 2)
    with pytest.raises(ValueError, match="shape must be"):
        ConditionalFlow((1, 4), 2)
    with pytest.raises(ValueError, match="cond_channels"):
        ConditionalFlow((3,), 0)
    with pytest.raises(ValueError, match="scale_bound"):
        ConditionalFlow((3,), 2, scale_bound=0.0)
