"""``fit``: learn a prior from observations by any method, in one run folder.

.. list-table::
    :header-rows: 1

    * - ``method``
      - what it is
    * - ``diem``
      - DiEM: EM from a Gaussian fit (:mod:`cleanprior.learning.em`)
    * - ``emdiffusion``
      - EM from a prior pre-trained on a few clean images, DPS retuned each round
        (:mod:`cleanprior.learning.emdiffusion`)
    * - ``flowdiff``
      - a conditional flow and the prior trained jointly (:mod:`cleanprior.learning.flowdiff`)
    * - ``ambient``, ``sure``, ``naive``, ``clean``
      - priors trained directly on data (:mod:`cleanprior.learning.baselines`)

Every method shares the run folder, resume, per-round evaluation and report of
:func:`cleanprior.learning.rounds.run_rounds`. A posterior method's name (``mmps``, ``dps``,
...) as ``method`` means DiEM with that E-step, as the first command line spelled it.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Any

import torch
from torch import Tensor

from cleanprior.learning.baselines import BASELINES, Direct
from cleanprior.learning.rounds import Method, run_rounds

__all__ = ["FitResult", "LEARNING_METHODS", "fit", "learning_method"]

LEARNING_METHODS = ("diem", "emdiffusion", "flowdiff", *BASELINES)
"""The names :func:`fit` takes as ``method``."""


@dataclasses.dataclass
class FitResult:
    """What :func:`fit` returns.

    Attributes:
        prior: The last round's prior, a denoiser usable by every sampler.
        start: The method's start (the Gaussian fit, the clean-image prior) or None.
        metrics: One dict per round.
        method: The method object (e.g. FlowDiff's, which holds the flow).
    """

    prior: Any
    start: Any
    metrics: list[dict[str, Any]]
    method: Any


def learning_method(name: str, *, init_clean: Tensor | None = None, flow: Any = None) -> tuple[Method, str | None]:
    """The method object a name stands for.

    Arguments:
        name: One of :data:`LEARNING_METHODS`, or a posterior method (DiEM with that E-step).
        init_clean: EMDiffusion's clean images, shape ``(n, *shape)``.
        flow: FlowDiff's :class:`~cleanprior.learning.flowdiff.FlowDiffConfig`.

    Returns:
        The method and, when ``name`` was a posterior method, that method's name (else None).

    Raises:
        ValueError: For an unknown name, or EMDiffusion without clean images.
    """
    from cleanprior.learning.em import DiEM
    from cleanprior.posterior.api import METHODS

    if name == "diem":
        return DiEM(), None
    if name in METHODS():
        return DiEM(), name
    if name == "emdiffusion":
        from cleanprior.learning.emdiffusion import EMDiffusion

        if init_clean is None:
            raise ValueError("emdiffusion starts from a few clean images: give init_clean (--init-clean FILE.npz with 'x')")
        return EMDiffusion(init_clean), None
    if name == "flowdiff":
        from cleanprior.learning.flowdiff import FlowDiffMethod

        return FlowDiffMethod(flow), None
    if name in BASELINES:
        return Direct(name), None
    raise ValueError(f"unknown learning method {name!r}; known: {', '.join(LEARNING_METHODS)} "
                     f"(or a posterior method for DiEM's E-step: {', '.join(METHODS())})")


def fit(
    observations: Any,
    run: str | os.PathLike[str],
    *,
    method: str = "diem",
    init_clean: Tensor | None = None,
    flow: Any = None,
    network: Any = None,
    config: Any = None,
    training: Any = None,
    evaluation: Any = None,
    device: str | torch.device = "cpu",
    resume: bool = False,
    progress: bool = True,
    description: str = "",
) -> FitResult:
    """Learn a prior from observations by ``method``, in the run folder ``run``.

    Arguments:
        observations: An :class:`~cleanprior.data.files.Observations`.
        run: The run folder.
        method: One of :data:`LEARNING_METHODS` (or a posterior method: DiEM with that E-step).
        init_clean: EMDiffusion's clean images, shape ``(n, *shape)``.
        flow: FlowDiff's :class:`~cleanprior.learning.flowdiff.FlowDiffConfig`.
        network: The denoiser's :class:`~cleanprior.runs.prior.NetworkConfig`.
        config: The :class:`~cleanprior.learning.em.EMConfig` (rounds, held-out split, seed,
            E-step options, the methods' own options).
        training: A round's :class:`~cleanprior.diffusion.training.TrainConfig`.
        evaluation: The :class:`~cleanprior.learning.em.EvalConfig`.
        device: Where to compute: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``, ``"cuda:N"``.
        resume: Continue the run in ``run``.
        progress: Show progress bars.
        description: What the observations are.

    Returns:
        The prior, the start, the metrics and the method object.

    Raises:
        FileExistsError: If ``run`` holds a run and ``resume`` is False (nothing is touched).
        ValueError: For an unknown method, observations it cannot use, or a resume with other
            options (before any work).
    """
    from cleanprior.diffusion.training import TrainConfig
    from cleanprior.learning.em import EMConfig, EvalConfig
    from cleanprior.runs.prior import NetworkConfig

    learner, posterior = learning_method(method, init_clean=init_clean, flow=flow)
    config = config or EMConfig()
    if posterior is not None:
        config = dataclasses.replace(config, posterior=posterior)
    prior, start, metrics = run_rounds(
        learner, observations, pathlib.Path(run), config=config, network=network or NetworkConfig(),
        training=training or TrainConfig(steps=2000, batch_size=128), evaluation=evaluation or EvalConfig(),
        device=device, resume=resume, progress=progress, description=description,
    )
    return FitResult(prior, start, metrics, learner)
