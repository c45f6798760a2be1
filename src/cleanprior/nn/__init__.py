r"""Noise-conditional networks :math:`F(x, c_{\text{noise}})` and their registry.

Every network takes ``forward(x, c_noise=None)`` with ``x`` batch first and ``c_noise`` of shape
``(B,)`` (or a scalar, broadcast to the batch), returns a tensor shaped like ``x`` (with the
output channels for the U-Net), and records its JSON-serialisable constructor arguments in
``net.config``, so that ``build_network(type(net).__name__, **net.config)`` rebuilds it.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from cleanprior.nn.embedding import SinusoidalEmbedding
from cleanprior.nn.masked import MaskedMLP, MaskedUNet
from cleanprior.nn.mlp import MLP
from cleanprior.nn.unet import UNet

__all__ = [
    "MLP",
    "MaskedMLP",
    "MaskedUNet",
    "NETWORKS",
    "SinusoidalEmbedding",
    "UNet",
    "build_network",
]

NETWORKS: dict[str, type[nn.Module]] = {
    "MLP": MLP,
    "MaskedMLP": MaskedMLP,
    "MaskedUNet": MaskedUNet,
    "UNet": UNet,
}


def build_network(name: str, **config: Any) -> nn.Module:
    """Build a registered network from its class name and configuration.

    Arguments:
        name: A key of :data:`NETWORKS`, e.g. ``"UNet"``.
        **config: The network's constructor arguments, typically a stored ``net.config``.

    Returns:
        The network.

    Raises:
        ValueError: If ``name`` is not registered.
    """
    if name not in NETWORKS:
        raise ValueError(f"unknown network {name!r}; known networks: {', '.join(sorted(NETWORKS))}")
    return NETWORKS[name](**config)
