r"""Priors trained directly on data, without EM: the bounds and the corruption-aware baselines.

Every learning method is measured against two bounds and two published baselines, each a
single training run (no posterior sampling), cut into rounds of ``training.steps`` steps so that
it has the same run folder, resume, per-round evaluation and report as EM:

- ``clean``: denoising score matching on the clean images the observation file carries under
  ``x`` (the upper bound: no learning method can know more);
- ``naive``: the corrupted data taken as if clean (the lower bound): the observations themselves
  when they have the signal's shape (masked, blurred or noisy images), :math:`A^\top y` otherwise;
- ``ambient``: AmbientDiffusion (:mod:`cleanprior.learning.ambient`): masked data corrupted
  further, the loss on the originally observed pixels; for noisy data with :math:`A = I`, its
  noisy-data form;
- ``sure``: SURE-based score matching for noisy data (:mod:`cleanprior.learning.sure`), for
  :math:`A = I` only.

The whole run trains ``rounds x training.steps`` steps with one learning-rate schedule, one
optimiser and one EMA (:func:`~cleanprior.diffusion.training.train` with ``until``), checkpointed
in ``RUN/train.pt``; round ``k`` ends at step ``k x training.steps`` and leaves its EMA prior in
``RUN/rounds/KK/denoiser.pt``.

References:
    Daras et al. (2023). Ambient Diffusion: Learning Clean Distributions from Corrupted Data.
    https://arxiv.org/abs/2305.19256
    Aali, Arvinte, Kumar & Tamir (2023). Solving Inverse Problems with Score-Based Generative
    Priors learned from Noisy Data (SURE-Score). https://arxiv.org/abs/2305.01166
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor

from cleanprior import distributed
from cleanprior.diffusion.training import TrainingLoss, train
from cleanprior.learning.rounds import Round, round_generator
from cleanprior.runs.checkpoint import load_denoiser, save_denoiser

__all__ = ["BASELINES", "Direct", "as_if_clean", "sampling_wrapper"]

BASELINES = ("clean", "naive", "ambient", "sure")
"""The methods of :class:`Direct`."""


def as_if_clean(observations: Any) -> Tensor:
    r"""The corrupted data taken as clean signals: ``y`` when it has the signal's shape, else :math:`A^\top y`.

    Arguments:
        observations: An :class:`~cleanprior.data.files.Observations` of ``N`` items.

    Returns:
        Signals, shape ``(N, *shape)``.
    """
    y = observations.y
    if tuple(y.shape[1:]) == tuple(observations.shape) and not y.is_complex():
        return y
    return observations.operator.adjoint(y).real


def sampling_wrapper(denoiser: Any, wrapper: dict[str, Any]) -> Any:
    """Wrap a denoiser learned from noisy data as its method samples it.

    Arguments:
        denoiser: The trained denoiser.
        wrapper: ``{"kind": "sure" | "ambient_noisy", "noise_std": sigma_y}`` or
            ``{"kind": "ambient_fixed", "keep": k, "seed": s}``, as the run recorded it in its
            checkpoint's metadata (``sampling_wrapper``).

    Returns:
        The wrapped denoiser.

    Raises:
        ValueError: For an unknown kind.
    """
    if wrapper.get("kind") == "sure":
        from cleanprior.learning.sure import SUREDenoiser

        return SUREDenoiser(denoiser, wrapper["noise_std"])
    if wrapper.get("kind") == "ambient_noisy":
        from cleanprior.learning.ambient import AmbientNoisyDenoiser

        return AmbientNoisyDenoiser(denoiser, wrapper["noise_std"])
    if wrapper.get("kind") == "ambient_fixed":
        from cleanprior.learning.ambient import FixedMaskDenoiser

        return FixedMaskDenoiser(denoiser, wrapper["keep"], wrapper["seed"])
    raise ValueError(f"unknown sampling wrapper {wrapper!r}")


def _masked_network(shape: tuple[int, ...], config: Any) -> Any:
    """The configured network's mask-conditioned twin (it sees ``[M x, M]``), preconditioned."""
    from cleanprior.diffusion.precondition import PreconditionedDenoiser
    from cleanprior.nn.masked import MaskedMLP, MaskedUNet

    if len(shape) == 1:
        network: Any = MaskedMLP(shape[0], hidden=config.hidden, dropout=config.dropout)
    else:
        network = MaskedUNet(in_channels=shape[0], channels=config.channels, blocks=config.blocks,
                             dropout=config.dropout)
    return PreconditionedDenoiser(network, sigma_data=config.sigma_data)


class Direct:
    """A prior trained directly on (possibly corrupted) data, in rounds (a
    :class:`~cleanprior.learning.rounds.Method`).

    Arguments:
        kind: One of :data:`BASELINES`.
    """

    start_label = ""

    def __init__(self, kind: str) -> None:
        if kind not in BASELINES:
            raise ValueError(f"unknown baseline {kind!r}; known: {', '.join(BASELINES)}")
        self.name = kind

    def check(self, observations: Any, config: Any) -> None:
        if self.name == "clean" and observations.x is None:
            raise ValueError("the clean baseline trains on the clean images, and this observation file has no 'x'")
        if self.name in ("ambient", "sure"):
            self._plan(observations, config)

    def settings(self) -> dict[str, Any]:
        return {}

    def start(self, context: Round) -> None:
        return None

    def _plan(self, observations: Any, config: Any) -> tuple[Tensor, TrainingLoss | None, Any, Any]:
        """The training data, the loss (None: score matching), a network factory and the sampling
        wrapper's description (None: the denoiser samples as it is; see :func:`sampling_wrapper`).

        Raises:
            ValueError: If the method does not apply to the observations' operator or noise.
        """
        from cleanprior.runs.prior import default_network

        if self.name == "clean":
            return observations.x, None, default_network, None
        if self.name == "naive":
            return as_if_clean(observations), None, default_network, None
        operator = observations.operator.name
        noise_std = torch.as_tensor(observations.noise_std, dtype=torch.float64)
        if self.name == "ambient" and operator == "mask":
            from cleanprior.learning.ambient import AmbientLoss

            masks = observations.operator.mask
            masks = masks.expand(len(observations), *masks.shape[1:]) if masks.shape[0] == 1 else masks
            loss = AmbientLoss((masks > 0).cpu(), delta=config.delta)
            keep = config.sampling_keep or (0.65 if len(observations.shape) == 3 else 1.0)
            wrapper = None if keep >= 1 else {"kind": "ambient_fixed", "keep": keep, "seed": config.seed}
            return observations.y, loss, _masked_network, wrapper
        if operator != "identity":
            what = "a mask or the identity" if self.name == "ambient" else "the identity (denoising)"
            raise ValueError(f"{self.name} learns from {what}, not from the operator {operator!r}")
        if not bool((noise_std == noise_std.flatten()[0]).all()) or not float(noise_std.flatten()[0]) > 0:
            raise ValueError(f"{self.name} needs one positive noise level shared by all observations")
        sigma_y = float(noise_std.flatten()[0])
        kind = "ambient_noisy" if self.name == "ambient" else "sure"
        if self.name == "ambient":
            from cleanprior.learning.ambient import AmbientNoisyLoss

            loss: TrainingLoss = AmbientNoisyLoss(sigma_y)
        else:
            from cleanprior.learning.sure import SURELoss

            loss = SURELoss(sigma_y)
        return observations.y, loss, default_network, {"kind": kind, "noise_std": sigma_y}

    def _train(self, context: Round, k: int) -> Any:
        data, loss, network, _ = self._plan(context.data, context.config)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(2**62, (), generator=round_generator(context.config.seed, 8))))
            model = network(context.shape, context.network).to(context.device)
        total = dataclasses.replace(context.training, steps=context.training.steps * context.config.rounds,
                                    progress=context.progress and distributed.is_main())
        metadata = {"trained_on": context.description, "shape": list(context.shape),
                    "network": dataclasses.asdict(context.network), "method": self.name}
        return train(model, data.to(context.device), total, generator=round_generator(context.config.seed, 4),
                     checkpoint=context.run / "train.pt", resume=True, metadata=metadata, loss=loss,
                     until=k * context.training.steps)

    def round(self, context: Round, k: int, prior: Any) -> tuple[Any, dict[str, Any]]:
        result = self._train(context, k)
        if distributed.is_main():
            metadata = {"trained_on": context.description, "shape": list(context.shape),
                        "network": dataclasses.asdict(context.network), "method": self.name, "round": k,
                        "sampling_wrapper": self._plan(context.data, context.config)[3]}
            context.folder(k).mkdir(parents=True, exist_ok=True)
            save_denoiser(context.folder(k) / "denoiser.pt", result.denoiser, metadata=metadata)
            save_denoiser(context.run / "checkpoint.pt", result.denoiser, metadata=metadata)
        distributed.barrier()
        tail = result.losses[-50:]
        return self._sampling(result.denoiser, context), {"loss": sum(tail) / max(1, len(tail))}

    def _sampling(self, denoiser: Any, context: Round) -> Any:
        wrapper = self._plan(context.data, context.config)[3]
        return denoiser if wrapper is None else sampling_wrapper(denoiser, wrapper)

    def restore(self, context: Round, k: int) -> Any:
        return self._sampling(load_denoiser(context.folder(k) / "denoiser.pt", device=context.device), context)

    def evaluate(self, context: Round, k: int, prior: Any) -> dict[str, Any]:
        return {}
