"""Tests of the noise-conditional networks: embedding, MLP and U-Net."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from cleanprior.nn import MLP, NETWORKS, SinusoidalEmbedding, UNet, build_network
from cleanprior.nn.masked import MaskedMLP, MaskedUNet
from cleanprior.nn.unet import SelfAttention2d

# Small U-Nets that still cover 3 levels, non-square sizes, channel changes, both forms of
# `blocks` and attention at a fine level.
UNET_CASES: list[tuple[dict[str, Any], tuple[int, int]]] = [
    ({"in_channels": 1, "channels": (8, 16, 16), "blocks": 1, "emb_features": 16}, (28, 28)),
    (
        {
            "in_channels": 3,
            "out_channels": 2,
            "channels": (8, 16),
            "blocks": (1, 2),
            "emb_features": 16,
        },
        (32, 32),
    ),
    (
        {
            "in_channels": 2,
            "channels": (8, 8, 16),
            "blocks": (2, 1, 1),
            "attention_levels": (0, 2),
            "heads": 2,
            "emb_features": 16,
        },
        (16, 24),
    ),
]
UNET_IDS = ["28x28-3levels", "32x32-3to2ch", "16x24-attn0"]


@pytest.fixture(autouse=True, scope="module")
def single_thread() -> Iterator[None]:
    """Run these tiny networks on one thread, restoring the setting afterwards.

    On a busy 2-core machine intra-op threads cost more in synchronisation than they save on
    networks this small (about 5x here).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def perturb_head(net: UNet, generator: torch.Generator) -> None:
    """Give the zero-initialised last convolution random weights, so that outputs are non-zero."""
    with torch.no_grad():
        for p in net.head.parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=generator))


def unet_inputs(
    net: UNet, size: tuple[int, int], generator: torch.Generator, batch: int = 2
) -> tuple[Tensor, Tensor]:
    x = torch.randn(batch, net.config["in_channels"], *size, generator=generator)
    c = torch.randn(batch, generator=generator)
    return x, c


def attention_levels_of(net: UNet) -> dict[str, set[int]]:
    """Map each part (encoder, decoder, middle) to the levels where it holds attention."""
    found: dict[str, set[int]] = {"encoder": set(), "decoder": set(), "middle": set()}
    for name, module in net.named_modules():
        if isinstance(module, SelfAttention2d):
            part, index = name.split(".")[:2]
            found[part].add(int(index) if part != "middle" else net.levels - 1)
    return found


# --------------------------------------------------------------------------------------------
# SinusoidalEmbedding


def test_embedding_shape() -> None:
    emb = SinusoidalEmbedding(16)
    assert emb(torch.linspace(-2, 2, 5)).shape == (5, 16)


def test_embedding_at_zero_is_cos_one_sin_zero() -> None:
    out = SinusoidalEmbedding(10)(torch.zeros(3))
    torch.testing.assert_close(out[:, :5], torch.ones(3, 5))
    torch.testing.assert_close(out[:, 5:], torch.zeros(3, 5))


def test_embedding_frequencies_are_geometric() -> None:
    features, max_period = 8, 100.0
    c = torch.tensor([0.7])
    out = SinusoidalEmbedding(features, max_period)(c)
    omega = torch.tensor([max_period ** (-k / 4) for k in range(4)])
    torch.testing.assert_close(out[0, :4], torch.cos(0.7 * omega))
    torch.testing.assert_close(out[0, 4:], torch.sin(0.7 * omega))


def test_embedding_distinct_inputs_are_distinct() -> None:
    # The range of c_noise = log(sigma) / 4 for sigma in [2e-3, 80].
    c = torch.linspace(math.log(2e-3) / 4, math.log(80) / 4, 64)
    out = SinusoidalEmbedding(32)(c)
    distances = torch.cdist(out, out) + torch.eye(len(c)) * 1e3
    assert distances.min() > 1e-3


@pytest.mark.parametrize("features", [7, 0, -4])
def test_embedding_rejects_odd_or_non_positive_features(features: int) -> None:
    with pytest.raises(ValueError, match="even"):
        SinusoidalEmbedding(features)


def test_embedding_follows_dtype() -> None:
    out = SinusoidalEmbedding(8).double()(torch.zeros(2, dtype=torch.float64))
    assert out.dtype == torch.float64


# --------------------------------------------------------------------------------------------
# MLP


def test_mlp_shape() -> None:
    net = MLP(3, hidden=(32, 32), emb_features=8)
    assert net(torch.randn(5, 3), torch.randn(5)).shape == (5, 3)


def test_mlp_broadcasts_scalar_c_noise() -> None:
    net = MLP(3, hidden=(32,), emb_features=8)
    x = torch.randn(4, 3)
    full = net(x, torch.full((4,), 0.3))
    torch.testing.assert_close(net(x, torch.tensor(0.3)), full)
    torch.testing.assert_close(net(x, torch.tensor([0.3])), full)


def test_mlp_output_depends_on_c_noise() -> None:
    net = MLP(3, hidden=(32,), emb_features=8)
    x = torch.randn(4, 3)
    assert not torch.allclose(net(x, torch.zeros(4)), net(x, torch.ones(4)))


def test_mlp_without_c_noise_feeds_zero_embedding() -> None:
    net = MLP(3, hidden=(32,), emb_features=8)
    x = torch.randn(4, 3)
    expected = net.layers(torch.cat([x, torch.zeros(4, 8)], dim=-1))
    torch.testing.assert_close(net(x), expected)


def test_mlp_config_round_trip() -> None:
    net = MLP(3, hidden=(16, 8), emb_features=8, dropout=0.1).eval()
    config = json.loads(json.dumps(net.config))
    assert config["hidden"] == [16, 8]
    clone = type(net)(**config).eval()
    clone.load_state_dict(net.state_dict())
    x, c = torch.randn(4, 3), torch.randn(4)
    torch.testing.assert_close(clone(x, c), net(x, c), rtol=0, atol=0)


def test_mlp_rejects_wrong_input() -> None:
    net = MLP(3, hidden=(8,), emb_features=8)
    with pytest.raises(ValueError, match=r"\(B, 3\)"):
        net(torch.randn(4, 2))
    with pytest.raises(ValueError, match="broadcast"):
        net(torch.randn(4, 3), torch.zeros(3))
    with pytest.raises(ValueError, match="emb_features"):
        MLP(3, emb_features=9)


# --------------------------------------------------------------------------------------------
# UNet


@pytest.mark.parametrize(("config", "size"), UNET_CASES, ids=UNET_IDS)
def test_unet_shape_and_zero_output_at_init(config: dict[str, Any], size: tuple[int, int]) -> None:
    gen = torch.Generator().manual_seed(0)
    net = UNet(**config)
    x, c = unet_inputs(net, size, gen)
    out = net(x, c)
    assert out.shape == (2, net.config["out_channels"], *size)
    assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize(("config", "size"), UNET_CASES, ids=UNET_IDS)
def test_unet_every_parameter_learns_after_one_step(
    config: dict[str, Any], size: tuple[int, int]
) -> None:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    net = UNet(**config)
    x, c = unet_inputs(net, size, gen)
    target = torch.randn(2, net.config["out_channels"], *size, generator=gen)
    optimiser = torch.optim.Adam(net.parameters(), lr=1e-2)

    def backward() -> None:
        optimiser.zero_grad()
        (net(x, c) - target).square().mean().backward()

    # At init only the zero last convolution gets a gradient; one step must unlock all others.
    backward()
    optimiser.step()
    backward()

    for name, p in net.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_unet_attention_at_configured_levels_only() -> None:
    net = UNet(channels=(8, 8, 16), blocks=1, attention_levels=(0, 2), heads=2, emb_features=16)
    assert attention_levels_of(net) == {"encoder": {0, 2}, "decoder": {0, 2}, "middle": {2}}

    net = UNet(channels=(8, 8, 16), blocks=(1, 2, 1), heads=2, emb_features=16)
    assert net.config["attention_levels"] == [2]
    assert attention_levels_of(net) == {"encoder": {2}, "decoder": {2}, "middle": {2}}
    # One attention after every residual block of level 2 and of the middle.
    assert sum(isinstance(m, SelfAttention2d) for m in net.modules()) == 1 + 1 + 2

    net = UNet(channels=(8, 16), blocks=1, attention_levels=(0,), heads=2, emb_features=16)
    assert attention_levels_of(net) == {"encoder": {0}, "decoder": {0}, "middle": set()}

    net = UNet(channels=(8, 16), blocks=1, attention_levels=(), emb_features=16)
    assert not any(isinstance(m, SelfAttention2d) for m in net.modules())


def test_unet_rejects_bad_constructor_arguments() -> None:
    with pytest.raises(ValueError, match="attention_levels"):
        UNet(channels=(8, 16), attention_levels=(2,))
    with pytest.raises(ValueError, match="heads"):
        UNet(channels=(8, 12), heads=8)
    with pytest.raises(ValueError, match="blocks"):
        UNet(channels=(8, 16), blocks=(1, 1, 1))
    with pytest.raises(ValueError, match="blocks"):
        UNet(channels=(8, 16), blocks=0)
    with pytest.raises(ValueError, match="emb_features"):
        UNet(channels=(8, 16), emb_features=15)


def test_unet_rejects_indivisible_size() -> None:
    net = UNet(channels=(8, 8, 16), blocks=1, heads=2, emb_features=16)
    with pytest.raises(ValueError, match=r"30x28 is not divisible by 4"):
        net(torch.randn(1, 1, 30, 28), torch.zeros(1))
    with pytest.raises(ValueError, match=r"divisible by 4"):
        net(torch.randn(1, 1, 28, 26), torch.zeros(1))


def test_unet_rejects_wrong_channels_and_dims() -> None:
    net = UNet(in_channels=3, channels=(8, 16), blocks=1, heads=2, emb_features=16)
    with pytest.raises(ValueError, match="3 input channels"):
        net(torch.randn(1, 1, 8, 8), torch.zeros(1))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        net(torch.randn(3, 8, 8), torch.zeros(1))


def test_unet_dropout_is_random_in_train_mode_only() -> None:
    gen = torch.Generator().manual_seed(0)
    net = UNet(channels=(8, 16), blocks=1, heads=2, dropout=0.5, emb_features=16)
    perturb_head(net, gen)
    x, c = unet_inputs(net, (8, 8), gen)
    net.train()
    assert not torch.allclose(net(x, c), net(x, c))
    net.eval()
    torch.testing.assert_close(net(x, c), net(x, c), rtol=0, atol=0)


@pytest.mark.parametrize(("config", "size"), UNET_CASES, ids=UNET_IDS)
def test_unet_returns_bottleneck_features(config: dict[str, Any], size: tuple[int, int]) -> None:
    gen = torch.Generator().manual_seed(0)
    net = UNet(**config)
    x, c = unet_inputs(net, size, gen)
    out, features = net(x, c, return_features=True)
    scale = 2 ** (net.levels - 1)
    assert out.shape == (2, net.config["out_channels"], *size)
    assert features.shape == (2, net.config["channels"][-1], size[0] // scale, size[1] // scale)


def test_unet_c_noise_broadcast_and_dependence() -> None:
    gen = torch.Generator().manual_seed(0)
    net = UNet(channels=(8, 16), blocks=1, heads=2, emb_features=16)
    perturb_head(net, gen)
    x, _ = unet_inputs(net, (8, 8), gen, batch=3)
    full = net(x, torch.full((3,), -0.5))
    torch.testing.assert_close(net(x, torch.tensor(-0.5)), full)
    torch.testing.assert_close(net(x, torch.tensor([-0.5])), full)
    assert not torch.allclose(net(x, torch.full((3,), 0.5)), full)
    with pytest.raises(ValueError, match="noise-conditional"):
        net(x)
    with pytest.raises(ValueError, match="broadcast"):
        net(x, torch.zeros(2))


def test_unet_without_noise_conditioning() -> None:
    gen = torch.Generator().manual_seed(0)
    net = UNet(channels=(8, 16), blocks=1, heads=2, noise_conditioning=False)
    assert net.embedding is None
    assert not any(isinstance(m, (nn.Linear, SinusoidalEmbedding)) for m in net.modules())
    perturb_head(net, gen)
    x, _ = unet_inputs(net, (8, 8), gen)
    out = net(x)
    assert out.shape == x.shape
    assert out.abs().sum() > 0
    with pytest.raises(ValueError, match="noise_conditioning=False"):
        net(x, torch.zeros(2))


def test_unet_float64() -> None:
    gen = torch.Generator().manual_seed(0)
    net = UNet(channels=(8, 16), blocks=1, heads=2, emb_features=16).double()
    perturb_head(net, gen)
    x = torch.randn(2, 1, 8, 8, generator=gen, dtype=torch.float64)
    out = net(x, torch.zeros(2, dtype=torch.float64))
    assert out.dtype == torch.float64
    assert out.shape == x.shape
    assert torch.isfinite(out).all()
    assert out.abs().sum() > 0


@pytest.mark.parametrize(("config", "size"), UNET_CASES, ids=UNET_IDS)
def test_unet_config_round_trip(config: dict[str, Any], size: tuple[int, int]) -> None:
    gen = torch.Generator().manual_seed(0)
    net = UNet(**config).eval()
    perturb_head(net, gen)
    stored = json.loads(json.dumps(net.config))
    clone = type(net)(**stored).eval()
    clone.load_state_dict(net.state_dict())
    assert clone.config == net.config
    x, c = unet_inputs(net, size, gen)
    out = net(x, c)
    assert out.abs().sum() > 0
    torch.testing.assert_close(clone(x, c), out, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# Registry


def test_build_network_from_name_and_config() -> None:
    assert NETWORKS == {"MLP": MLP, "MaskedMLP": MaskedMLP, "MaskedUNet": MaskedUNet, "UNet": UNet}
    net = UNet(channels=(8, 16), blocks=1, heads=2, emb_features=16)
    clone = build_network("UNet", **net.config)
    assert isinstance(clone, UNet)
    assert clone.config == net.config
    assert isinstance(build_network("MLP", features=2, hidden=[8]), MLP)


def test_build_network_rejects_unknown_name() -> None:
    with pytest.raises(ValueError, match=r"'Transformer'.*MLP, MaskedMLP, MaskedUNet, UNet"):
        build_network("Transformer")
