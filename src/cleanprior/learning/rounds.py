r"""A run of rounds: what every way of learning a prior from observations shares.

DiEM, EMDiffusion, FlowDiff and the baselines all learn a prior in *rounds* (an EM round, or a
chunk of training), and a user wants the same things from each: a run folder with the resolved
configuration, a held-out split of the observations that no round trains on, after every round a
checkpoint, metrics (:func:`~cleanprior.learning.evaluation.evaluate_round`), figures and an HTML
report, and a run that, killed at any moment, resumes from what it had finished. This module is
that loop; a method only says how it starts and what one round does (:class:`Method`).

.. code-block:: text

    RUN/config.json          the resolved configuration (method, observations, every option)
    RUN/state.json           rounds completed and their metrics (written last in a round)
    RUN/checkpoint.pt        the latest round's prior (``load_denoiser`` reads it)
    RUN/rounds/KK/           the round's own files and figures (KK = 00 is the start)
    RUN/metrics.json, RUN/report.html, RUN/metrics.png
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time
from typing import Any, Protocol

import torch

from cleanprior import distributed
from cleanprior.runs.atomic import write_json

__all__ = ["Method", "Round", "run_rounds", "round_generator"]


def round_generator(seed: int, *keys: int, device: torch.device | str = "cpu") -> torch.Generator:
    """One generator per (seed, purpose, round, batch): results do not depend on the order of work.

    Arguments:
        seed: The run's seed.
        keys: What the draws are for (a purpose code, the round, the batch...).
        device: The generator's device.

    Returns:
        A generator seeded from ``seed`` and ``keys``.
    """
    value = seed
    for key in keys:
        value = (value * 1_000_003 + key) % (2**62)
    return torch.Generator(device=device).manual_seed(value)


@dataclasses.dataclass
class Round:
    """What a method's round sees.

    Attributes:
        run: The run folder.
        data: The observations it learns from (held-out ones removed), on ``device``.
        heldout: The held-out observations, on ``device`` (``None`` when ``config.heldout`` is 0).
        config: The :class:`~cleanprior.learning.em.EMConfig` (rounds, seed, E-step options).
        training: The :class:`~cleanprior.diffusion.training.TrainConfig` of a round's training.
        evaluation: The :class:`~cleanprior.learning.em.EvalConfig`.
        network: The denoiser's :class:`~cleanprior.runs.prior.NetworkConfig`.
        device: The compute device.
        progress: Whether to show progress bars.
        description: What the observations are.
    """

    run: pathlib.Path
    data: Any
    heldout: Any
    config: Any
    training: Any
    evaluation: Any
    network: Any
    device: torch.device
    progress: bool
    description: str

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of one clean sample."""
        return tuple(self.data.shape)

    def folder(self, k: int) -> pathlib.Path:
        """The folder of round ``k``."""
        return self.run / "rounds" / f"{k:02d}"


class Method(Protocol):
    """A way of learning a prior, in rounds.

    Attributes:
        name: The method's name (``diem``, ``emdiffusion``, ...), recorded in the run folder.
        start_label: What round 0 is called in the report (empty: the method has no round 0).
    """

    name: str
    start_label: str

    def check(self, observations: Any, config: Any) -> None:
        """Refuse, before any work, observations or options the method cannot use (ValueError)."""
        ...

    def settings(self) -> dict[str, Any]:
        """The method's own options, JSON-serialisable (a resumed run must match them)."""
        ...

    def start(self, context: Round) -> tuple[Any, bool] | None:
        """The prior before any round (fitted or loaded from the run folder), or None.

        Returns:
            ``(prior, exact)``, with ``exact`` whether the prior samples exactly (no sampler),
            or None for a method without a start.
        """
        ...

    def round(self, context: Round, k: int, prior: Any) -> tuple[Any, dict[str, Any]]:
        """Round ``k`` (from 1): the new prior, a denoiser, and the round's own metrics.

        It may write into ``context.folder(k)`` and must be resumable: files it finds there from
        an interrupted attempt are work already done.
        """
        ...

    def restore(self, context: Round, k: int) -> Any:
        """The prior after the completed round ``k`` (from its files)."""
        ...

    def evaluate(self, context: Round, k: int, prior: Any) -> dict[str, Any]:
        """Metrics of the method's own beyond those of the prior (e.g. an amortized posterior)."""
        ...


def run_rounds(
    method: Method,
    observations: Any,
    run: pathlib.Path,
    *,
    config: Any,
    training: Any,
    evaluation: Any,
    network: Any,
    device: str | torch.device = "cpu",
    resume: bool = False,
    progress: bool = True,
    description: str = "",
) -> tuple[Any, Any, list[dict[str, Any]]]:
    """Run a method's rounds in a run folder, with resume, evaluation and report.

    Arguments:
        method: The learning method.
        observations: An :class:`~cleanprior.data.files.Observations` of ``N`` items.
        run: The run folder.
        config: An :class:`~cleanprior.learning.em.EMConfig` (``rounds``, ``heldout``, ``seed``).
        training: A round's :class:`~cleanprior.diffusion.training.TrainConfig`.
        evaluation: An :class:`~cleanprior.learning.em.EvalConfig`.
        network: A :class:`~cleanprior.runs.prior.NetworkConfig`.
        device: Where to compute: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``, ``"cuda:N"``.
        resume: Continue the run in ``run``; its configuration must match (``rounds`` may grow).
        progress: Show progress bars.
        description: What the observations are.

    Returns:
        ``(prior, start, metrics)``: the last round's prior (the start if no round ran), the
        start (``None`` for a method without one) and one metrics dict per round.

    Raises:
        FileExistsError: If ``run`` holds a run and ``resume`` is False (nothing is touched).
        ValueError: If resuming with another configuration, if ``heldout`` leaves nothing, or if
            the method refuses the observations or options.
    """
    from cleanprior.learning.evaluation import evaluate_round
    from cleanprior.runs.report import write_report

    run = pathlib.Path(run)
    method.check(observations, config)
    if config.heldout >= len(observations):
        raise ValueError(f"heldout={config.heldout} leaves no observation to learn from out of {len(observations)}")
    settings = {
        "command": "fit",
        "method": method.name,
        "observations": {"description": description, "count": len(observations), "shape": list(observations.shape),
                         "y_shape": list(observations.y.shape[1:]), "operator": observations.operator.name},
        "network": dataclasses.asdict(network),
        "em": dataclasses.asdict(config),
        "training": dataclasses.asdict(training),
        "evaluation": dataclasses.asdict(evaluation),
        "options": method.settings(),
        "device": str(device),
    }
    if (run / "config.json").exists() and not resume:
        raise FileExistsError(f"{run} already holds a run; pass resume=True (--resume) to continue it, or choose another folder")
    if resume and (run / "config.json").exists():
        from cleanprior.runs.config import with_defaults

        previous = json.loads((run / "config.json").read_text())

        # a folder written before an option existed holds that option at its default; the E-step's
        # method was first recorded as "method"
        defaults = json.loads(json.dumps({"em": dataclasses.asdict(type(config)()), "options": {},
                                          "training": dataclasses.asdict(type(training)()),
                                          "network": dataclasses.asdict(type(network)())}, default=str))
        legacy = dict(previous.get("em", {}))
        if "method" in legacy and "posterior" not in legacy:
            legacy["posterior"] = legacy.pop("method")
        previous = dict(previous, em=legacy)
        previous = with_defaults(previous, defaults)
        if config.batch_size == 0 and previous["em"].get("batch_size"):
            # a batch size left to the device continues a run with the one it recorded
            config = dataclasses.replace(config, batch_size=previous["em"]["batch_size"])
            settings["em"] = dataclasses.asdict(config)

        def comparable(s: dict[str, Any]) -> dict[str, Any]:
            return dict(s, em={k: v for k, v in s.get("em", {}).items() if k != "rounds"}, evaluation=None, device=None)

        now, before = comparable(json.loads(json.dumps(settings, default=str))), comparable(previous)
        changed = sorted(k for k in now if now[k] != before.get(k))
        if changed:
            raise ValueError(f"cannot resume {run}: its {', '.join(changed)} configuration differs from the one given")
    device = distributed.setup(device)

    distributed.barrier()  # every rank has checked the folder before rank 0 writes to it
    if distributed.is_main():
        run.mkdir(parents=True, exist_ok=True)
        write_json(run / "config.json", json.loads(json.dumps(settings, default=str)))
    distributed.barrier()
    state_path = run / "state.json"
    state = json.loads(state_path.read_text()) if state_path.exists() else {"rounds": -1, "metrics": []}

    # both parts go to the device here, where the data enter it: every round, the E-step and the
    # evaluation then compute on tensors that are already there
    split = torch.randperm(len(observations), generator=round_generator(config.seed, 1))
    context = Round(
        run=run,
        data=observations.subset(split[config.heldout :]).to(device),
        heldout=observations.subset(split[: config.heldout]).to(device) if config.heldout else None,
        config=config, training=training, evaluation=evaluation, network=network, device=device,
        progress=progress, description=description,
    )
    label = method.start_label

    def finish(k: int, prior: Any, exact: bool, extra: dict[str, Any]) -> None:
        # rank 0 measures and writes; state.json is written last, so a round counts once it is there
        if distributed.is_main():
            if k == 0 or k == config.rounds or k % evaluation.every == 0:
                row = evaluate_round(prior, context.heldout, context.folder(k), evaluation, config, round_index=k,
                                     exact=exact, seed=config.seed, device=device, shape=context.shape)
                if not exact:
                    row.update(method.evaluate(context, k, prior))
            else:
                row = {"round": k}
            row.update(extra)
            metrics.append(row)
            write_report(run, metrics, description=description, start_label=label)
            write_json(state_path, {"rounds": k, "metrics": metrics})
        distributed.barrier()

    metrics: list[dict[str, Any]] = list(state["metrics"])
    began = time.perf_counter()
    started = method.start(context)
    start = None if started is None else started[0]
    if state["rounds"] < 0:
        if started is not None:
            finish(0, started[0], started[1], {"start_seconds": time.perf_counter() - began})
        elif distributed.is_main():
            write_json(state_path, {"rounds": 0, "metrics": metrics})
        distributed.barrier()
        state = json.loads(state_path.read_text())
        metrics = list(state["metrics"])

    prior = start if state["rounds"] == 0 else method.restore(context, state["rounds"])
    for k in range(state["rounds"] + 1, config.rounds + 1):
        began = time.perf_counter()
        prior, extra = method.round(context, k, prior)
        extra.setdefault("round_seconds", time.perf_counter() - began)
        finish(k, prior, False, extra)
        metrics = json.loads(state_path.read_text())["metrics"]
    if distributed.is_main():
        write_json(run / "metrics.json", metrics)
    return prior, start, metrics
