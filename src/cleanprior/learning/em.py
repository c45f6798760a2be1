r"""DiEM: expectation-maximization of a diffusion prior from observations only.

Given observations :math:`y_i = A_i x_i + n_i`, :math:`n_i \sim \mathcal{N}(0, \sigma_{y,i}^2 I)`,
with operators that may differ per observation, EM looks for the prior :math:`q_\theta(x)` that
maximises :math:`\sum_i \log q_\theta(y_i \mid A_i)`. Round :math:`k` alternates

- **E-step**: draw :math:`x_i \sim q_{\theta_k}(x \mid y_i, A_i)` for every observation (one or more
  samples each) with a posterior sampler of :mod:`cleanprior.posterior` (MMPS by default; the first
  round samples the exact posterior of the Gaussian start);
- **M-step**: train the denoiser on the :math:`x_i` by denoising score matching, warm-started from
  :math:`\theta_k` with a fresh optimiser, keeping the EMA weights as :math:`\theta_{k+1}`.

Before any network, :func:`~cleanprior.learning.gaussian.fit_gaussian` fits a Gaussian prior by
closed-form EM: it is round 0, and its exact posterior starts the first E-step.

Every round writes its checkpoint, metrics and plots into the run folder, and a round is the
unit of resume: a run killed at any moment continues with ``resume=True`` from what it had
finished (the Gaussian start, every completed E-step batch, the M-step's last training
checkpoint, every completed round), and loses nothing else.

.. code-block:: text

    RUN/config.json              the resolved configuration
    RUN/state.json               rounds completed and their metrics (written last in a round)
    RUN/gaussian.pt              the Gaussian start
    RUN/checkpoint.pt            the latest round's EMA denoiser (``load_denoiser`` reads it)
    RUN/rounds/KK/estep/*.pt     the E-step's posterior samples, one file per batch
    RUN/rounds/KK/train.pt       the M-step's training checkpoint (EMA and optimiser state)
    RUN/rounds/KK/*.png          prior samples and held-out reconstructions of round KK
    RUN/metrics.json, report.html, metrics.png

Under ``torchrun`` the E-step's batches are dealt to the ranks and the M-step is data-parallel
(:mod:`cleanprior.distributed`); every batch has its own generator, seeded from the run's seed,
the round and the batch's index, so the samples do not depend on the number of processes.

References:
    Rozet, Andry, Lanusse & Louppe (2024). Learning Diffusion Priors from Observations by
    Expectation Maximization (DiEM), algorithm 1 and section 4. https://arxiv.org/abs/2405.13712
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import pathlib
import time
from typing import Any

import torch
from torch import Tensor

from cleanprior import distributed
from cleanprior.diffusion.precondition import PreconditionedDenoiser
from cleanprior.diffusion.training import TrainConfig, train
from cleanprior.learning.rounds import Round, round_generator, run_rounds
from cleanprior.runs.atomic import write_json
from cleanprior.runs.checkpoint import (
    load_checkpoint,
    load_denoiser,
    save_checkpoint,
    save_denoiser,
)

__all__ = ["EMConfig", "EMResult", "EvalConfig", "estep_batch_size", "fit_em", "posterior_batches"]

CPU_BATCH_SIZE = 256
"""Observations per E-step batch on the CPU when ``EMConfig.batch_size`` is 0 (the default
before batch sizes were chosen from the device)."""

PROBE_OBSERVATIONS = 4
"""Observations in the probe batch that measures an E-step's memory per sample on a GPU."""

MEMORY_HEADROOM = 0.5
"""The fraction of a GPU's free memory an E-step batch may fill: the rest absorbs what the probe
does not see (the allocator's fragmentation, the solver's extra iterations, the M-step's cache)."""


@dataclasses.dataclass
class EMConfig:
    """Options of DiEM's rounds.

    Attributes:
        rounds: EM rounds after the Gaussian start (a resumed run may raise it to go on).
        posterior: The E-step's posterior method (any of :func:`cleanprior.posterior.METHODS`).
        steps: Sampler steps per posterior sample.
        sampler: The sampler that runs the guidance rule (``ddim``, ``ddpm``, ``heun``, ``pc``).
        samples: Posterior samples per observation per round.
        batch_size: Observations per E-step batch (one denoiser call carries ``batch_size x
            samples`` samples); 0 chooses from the device (:func:`estep_batch_size`): 256 on the
            CPU, on a GPU as many as half its free memory holds.
        solver: The Krylov solver of MMPS-like methods. GMRES by default: a trained network's
            Jacobian is not symmetric positive definite, and CG diverged on it (see the demo).
        iterations: The solver's iterations.
        gaussian_rank: Rank of the Gaussian start's covariance: 0 for a dense covariance (low
            dimension), ``r > 0`` for low rank plus diagonal (images).
        gaussian_iterations: EM iterations of the Gaussian start.
        gaussian_samples: Posterior samples per observation in each Monte-Carlo EM iteration of
            the low-rank Gaussian start.
        heldout: Observations kept out of the E-step and M-step for the per-round diagnostics.
        seed: The run's seed: the held-out split, the Gaussian start, every E-step batch and
            every M-step derive their generators from it.
        zetas: EMDiffusion: the DPS step sizes tried at the start of each round (the one whose
            held-out posterior predictive check is nearest 1 runs the E-step).
        tune_observations: EMDiffusion: held-out observations that choose the step size.
        delta: AmbientDiffusion: the fraction of the observed pixels hidden again (further
            corruption) in every training example.
        sampling_keep: AmbientDiffusion on masks: the fraction of the entries that the fixed
            mask of each sampling trajectory keeps (the paper's fixed-mask sampler,
            :class:`~cleanprior.learning.ambient.FixedMaskDenoiser`); 1 shows the network every
            entry, a mask it never saw in training. 0 chooses by the data's shape: 0.65 for
            images, 1 for vectors. Measured on MNIST with 75 % missing (seed 0, Frechet distance
            of 256 samples): 1354 / 1034 / 584 / 353 / 434 / 754 / 1573 at 0.25 / 0.35 / 0.5 /
            0.65 / 0.75 / 0.85 / 1; on the 5-D manifold with 40 % missing (Sinkhorn):
            0.35 / 0.25 / 0.21 / 0.18 at 0.5 / 0.75 / 0.9 / 1.
    """

    rounds: int = 4
    posterior: str = "mmps"
    steps: int = 32
    sampler: str = "ddpm"
    samples: int = 1
    batch_size: int = 0
    solver: str = "gmres"
    iterations: int = 1
    gaussian_rank: int = 0
    gaussian_iterations: int = 16
    gaussian_samples: int = 2
    heldout: int = 64
    seed: int = 0
    zetas: tuple[float, ...] = (0.1, 0.3, 1.0, 3.0, 10.0)
    tune_observations: int = 16
    delta: float = 0.1
    sampling_keep: float = 0.0

    def __post_init__(self) -> None:
        for name in ("rounds", "steps", "samples", "batch_size", "iterations", "gaussian_iterations",
                     "gaussian_samples"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name in ("rounds", "batch_size") else 1):
                raise ValueError(f"EMConfig.{name} must be a positive integer, got {value!r}")
        if self.gaussian_rank < 0 or self.heldout < 0:
            raise ValueError("EMConfig.gaussian_rank and EMConfig.heldout must be non-negative")
        self.zetas = tuple(float(z) for z in self.zetas)
        if not self.zetas or not all(z > 0 for z in self.zetas):
            raise ValueError(f"EMConfig.zetas must be positive step sizes, got {self.zetas}")
        if not 0 < self.delta < 1:
            raise ValueError(f"EMConfig.delta must lie in (0, 1), got {self.delta}")
        if not 0 <= self.sampling_keep <= 1:
            raise ValueError(f"EMConfig.sampling_keep must lie in [0, 1], got {self.sampling_keep}")

    def posterior_options(self) -> dict[str, Any]:
        """The options handed to :func:`cleanprior.sample_posterior` in the E-step."""
        from cleanprior.posterior.api import method_options

        options: dict[str, Any] = {"steps": self.steps, "sampler": self.sampler}
        if "solver" in method_options(self.posterior):
            options.update(solver=self.solver, iterations=self.iterations)
        return options


@dataclasses.dataclass
class EvalConfig:
    """What is measured and drawn after every round (see :mod:`cleanprior.learning.evaluation`).

    Attributes:
        method: The posterior method of the held-out reconstructions (with the E-step's steps,
            sampler and solver), the same for every learning method so that their figures compare.
        prior_samples: Prior samples drawn for the plots and the distances to clean data.
        posterior_samples: Posterior samples per held-out observation.
        shown: Held-out observations shown in the reconstruction figure.
        steps: Sampler steps of the prior samples.
        reference: Clean data for the distances of prior samples: an embedded dataset's name (its
            test split; the Frechet distance uses a classifier trained on its training split) or
            a ``.npz`` with clean samples under ``x``; empty: the held-out observations' ``x`` when
            the file has it, else no distance.
        frechet: The embedded dataset whose feature network the Frechet distance uses (empty:
            ``reference`` when it names one; no Frechet distance otherwise).
        evidence_observations: Held-out observations whose exact log-evidence under the Gaussian
            start is computed (it builds an ``m x m`` covariance per observation).
        inception: Also the Inception FID of prior samples to ``reference`` (needs pytorch-fid
            and its weights on disk; without them a warning says how to get them, and the run
            goes on).
        every: Measure every ``every``-th round only (and the start and the last round), for
            long runs where the evaluation would cost more than the rounds.
        iterations: Krylov solver iterations of the held-out reconstructions (0: the E-step's).
            One iteration suits the E-step's many samples; a blur needs more to fit its data
            (MNIST, blur std 1.5 px: posterior check 14.6 with one, 1.35 with four; clean
            prior's posterior 18.1 -> 23.3 dB).
    """

    method: str = "mmps"
    prior_samples: int = 64
    posterior_samples: int = 4
    shown: int = 8
    steps: int = 32
    reference: str = ""
    frechet: str = ""
    evidence_observations: int = 16
    inception: bool = False
    every: int = 1
    iterations: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 1:
            raise ValueError(f"EvalConfig.every must be a positive integer, got {self.every!r}")
        if isinstance(self.iterations, bool) or not isinstance(self.iterations, int) or self.iterations < 0:
            raise ValueError(f"EvalConfig.iterations must be a non-negative integer, got {self.iterations!r}")


@dataclasses.dataclass
class EMResult:
    """What :func:`fit_em` returns.

    Attributes:
        denoiser: The last round's EMA denoiser (``None`` if no round ran).
        gaussian: The Gaussian start.
        metrics: One dict per round, round 0 the Gaussian start.
    """

    denoiser: PreconditionedDenoiser | None
    gaussian: Any
    metrics: list[dict[str, Any]]


def _save_gaussian(path: pathlib.Path, gaussian: Any, description: str) -> None:
    names = ("mean", "covariance") if not gaussian.low_rank else ("mean", "factor", "diagonal")
    save_checkpoint(path, {
        "gaussian": {name: getattr(gaussian, name).detach().cpu() for name in names},
        "shape": list(gaussian.shape),
        "metadata": {"trained_on": description},
    })


def _load_gaussian(path: pathlib.Path) -> Any:
    from cleanprior.learning.gaussian import GaussianPrior

    payload = load_checkpoint(path, keys=("gaussian", "shape"))
    try:
        parameters = payload["gaussian"]
        return GaussianPrior(parameters.pop("mean"), **parameters, shape=payload["shape"])
    except (KeyError, TypeError, ValueError) as error:
        from cleanprior.runs.checkpoint import CheckpointError

        raise CheckpointError(f"{path} does not hold a valid Gaussian start: {error}") from None


def _draw(prior: Any, part: Any, config: EMConfig, generator: torch.Generator, exact: bool,
          options: dict[str, Any]) -> Tensor:
    """Posterior samples of one batch of observations, shape ``(len(part), *shape)``, on their device."""
    from cleanprior.posterior.api import sample_posterior

    if exact:
        return prior.sample_posterior(part.operator, part.y, part.noise_std, generator=generator)
    return sample_posterior(prior, part.operator, part.y, shape=part.shape, noise_std=part.noise_std,
                            method=config.posterior, generator=generator, **config.posterior_options(), **options)


def estep_batch_size(prior: Any, observations: Any, config: EMConfig, samples: int, *, exact: bool = False,
                     options: dict[str, Any] | None = None) -> int:
    """Observations per E-step batch for ``EMConfig.batch_size = 0``, chosen from the device.

    On the CPU, :data:`CPU_BATCH_SIZE`. On a GPU, one probe batch of
    :data:`PROBE_OBSERVATIONS` observations (``samples`` each) runs the E-step's posterior method
    for two sampler steps (the peak of a step is that of every step); its peak memory per sample,
    against :data:`MEMORY_HEADROOM` of the memory free (``torch.cuda.mem_get_info`` plus what
    torch's allocator holds unused), gives the batch: at least 1, at most ``N``. Samples drawn
    with another batch size differ (each batch has its own generator), so a resumed E-step reads
    the size it started with (:func:`posterior_batches`).

    Arguments:
        prior: The E-step's prior (see :func:`posterior_batches`).
        observations: The :class:`~cleanprior.data.files.Observations`, on the computing device.
        config: The E-step options.
        samples: Posterior samples per observation.
        exact: Whether ``prior`` samples its posterior exactly.
        options: More options of the posterior method.

    Returns:
        The number of observations per batch.
    """
    device = observations.y.device
    if device.type != "cuda":
        return CPU_BATCH_SIZE
    n = len(observations)
    probe = observations.subset(torch.arange(min(n, PROBE_OBSERVATIONS)).repeat_interleave(samples))
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    _draw(prior, probe, dataclasses.replace(config, steps=2), torch.Generator(device=device).manual_seed(0), exact,
          options or {})
    per_sample = max(1, torch.cuda.max_memory_allocated(device) - before) / len(probe)
    free, _ = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return max(1, min(n, int(MEMORY_HEADROOM * free / (per_sample * samples))))


def posterior_batches(
    prior: Any,
    observations: Any,
    *,
    config: EMConfig,
    samples: int,
    seed_keys: tuple[int, ...],
    folder: pathlib.Path | None = None,
    exact: bool = False,
    progress: bool = False,
    desc: str = "E-step",
    distribute: bool = True,
    options: dict[str, Any] | None = None,
) -> Tensor:
    """Posterior samples for every observation, batch by batch, across ranks, resumable.

    Arguments:
        prior: A denoiser (or, with ``exact``, a prior with ``sample_posterior(A, y, noise_std,
            generator)``, such as the Gaussian start).
        observations: An :class:`~cleanprior.data.files.Observations` of ``N`` items.
        config: The E-step options.
        samples: Posterior samples per observation ``S``.
        seed_keys: What, with ``config.seed``, seeds each batch's generator (e.g. the round).
        folder: Where completed batches are written and found again on resume (none: kept in
            memory only).
        exact: Sample with ``prior.sample_posterior`` rather than a guided sampler.
        progress: Show a progress bar over batches.
        desc: The progress bar's label.
        distribute: Deal the batches to the ranks (False: this process does them all, with no
            collective call; for work that only rank 0 does, such as evaluation).
        options: More options of the posterior method (e.g. DPS's ``zeta``).

    Returns:
        Samples, shape ``(N * S, *shape)``, observation-major (the ``S`` samples of
        observation ``i`` are rows ``i S`` to ``i S + S - 1``), on the CPU.
    """
    n = len(observations)
    device = observations.y.device
    world, rank = (distributed.world_size(), distributed.rank()) if distribute else (1, 0)
    barrier = distributed.barrier if distribute else (lambda: None)
    # a batch size chosen from the device is written beside the batches: the partition, and so
    # every batch's samples, stay those of the first attempt when a resumed E-step runs elsewhere
    chosen = folder / "batch_size.json" if folder is not None and not config.batch_size else None
    size = config.batch_size or (int(json.loads(chosen.read_text())["batch_size"]) if chosen and chosen.exists() else 0)
    if chosen is not None:
        barrier()  # every rank has looked for the file before rank 0 may write it
    if not size:
        size = estep_batch_size(prior, observations, config, samples, exact=exact, options=options)
        if world > 1:  # one partition for all ranks: the smallest memory decides
            size = int(min(rows.min() for rows in distributed.all_gather_rows(torch.tensor([size], device=device))))
        if chosen is not None and rank == 0:
            folder.mkdir(parents=True, exist_ok=True)
            write_json(chosen, {"batch_size": size})
    batches = [torch.arange(start, min(start + size, n)) for start in range(0, n, size)]
    mine = [b for b in range(len(batches)) if b % world == rank]
    if folder is not None and rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
    barrier()

    done: dict[int, Tensor] = {}
    iterator: Any = mine
    if progress and rank == 0:
        from tqdm.auto import tqdm

        iterator = tqdm(mine, desc=desc, unit="batch", dynamic_ncols=True)
    for b in iterator:
        path = folder / f"batch_{b:05d}.pt" if folder is not None else None
        if path is not None and path.exists():
            continue
        # each observation ``samples`` times in a row: subset repeats the per-item parameters too
        part = observations.subset(batches[b].repeat_interleave(samples))
        generator = round_generator(config.seed, *seed_keys, b, device=device)
        x = _draw(prior, part, config, generator, exact, options or {}).detach().to("cpu", observations.y.real.dtype)
        if path is None:
            done[b] = x
        else:
            save_checkpoint(path, {"samples": x, "batch": b})
    barrier()
    if folder is not None:
        return torch.cat([load_checkpoint(folder / f"batch_{b:05d}.pt", keys=("samples",))["samples"] for b in range(len(batches))])
    if world == 1:
        return torch.cat([done[b] for b in range(len(batches))])
    local = torch.cat([done[b] for b in mine]) if mine else torch.zeros((0, *observations.shape),
                                                                        dtype=observations.y.real.dtype)
    # NCCL gathers only tensors on the GPU: the rows travel on the computing device
    gathered = [rows.cpu() for rows in distributed.all_gather_rows(local.to(device))]
    # rank r holds batches r, r + world, ... in that order: deal them back into batch order
    pieces: dict[int, Tensor] = {}
    for r, rows in enumerate(gathered):
        owned = list(range(r, len(batches), world))
        for b, piece in zip(owned, torch.split(rows, [len(batches[b]) * samples for b in owned])):
            pieces[b] = piece
    return torch.cat([pieces[b] for b in range(len(batches))])


def m_step(context: Round, k: int, x: Tensor, warm: PreconditionedDenoiser | None, method: str) -> tuple[PreconditionedDenoiser, dict[str, Any]]:
    """Train the denoiser on a round's samples by denoising score matching (the M-step).

    Warm-started from ``warm`` with a fresh optimiser; a new network, its initial weights drawn
    from the run's seed, when ``warm`` is None. The training checkpoint is
    ``RUN/rounds/KK/train.pt`` (resumable), and the EMA denoiser is also written to
    ``RUN/checkpoint.pt``.

    Arguments:
        context: The run.
        k: The round.
        x: The samples to train on, shape ``(N, *shape)``.
        warm: The previous round's denoiser, or None.
        method: The learning method's name (recorded in the checkpoint).

    Returns:
        The EMA denoiser and the round's M-step metrics (``mstep_seconds``, ``loss``).
    """
    from cleanprior.runs.prior import default_network

    if warm is None:
        # torch's initialisers draw from the global generator: a scoped seed makes the initial
        # weights a function of the run's seed, equal on every rank, and leaves the caller's
        # global state as it was
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(2**62, (), generator=round_generator(context.config.seed, 8))))
            model = default_network(context.shape, context.network)
    else:
        model = copy.deepcopy(warm)
    model = model.to(context.device).requires_grad_(True)
    training = dataclasses.replace(context.training, progress=context.progress and distributed.is_main())
    metadata = {"trained_on": context.description, "shape": list(context.shape),
                "network": dataclasses.asdict(context.network), "em_round": k, "method": method}
    began = time.perf_counter()
    result = train(model, x.to(context.device), training, generator=round_generator(context.config.seed, 4, k),
                   checkpoint=context.folder(k) / "train.pt", resume=True, metadata=metadata)
    seconds = time.perf_counter() - began
    if distributed.is_main():
        save_denoiser(context.run / "checkpoint.pt", result.denoiser, metadata=metadata)
    tail = result.losses[-50:]
    return result.denoiser, {"mstep_seconds": seconds, "loss": sum(tail) / max(1, len(tail))}


class DiEM:
    """DiEM's rounds (a :class:`~cleanprior.learning.rounds.Method`): the Gaussian start, then
    E-step by posterior sampling and M-step by denoising score matching.

    Files: ``RUN/gaussian.pt`` (the start), ``RUN/rounds/KK/estep/batch_*.pt`` (the E-step's
    samples), ``RUN/rounds/KK/train.pt`` (the M-step's training checkpoint).
    """

    name = "diem"
    start_label = "Gaussian start"

    def __init__(self) -> None:
        self.gaussian: Any = None

    def check(self, observations: Any, config: EMConfig) -> None:
        """Refuse an unknown E-step method before any work."""
        from cleanprior.posterior.api import METHODS

        if config.posterior not in METHODS():
            raise ValueError(f"unknown posterior method {config.posterior!r}; known methods: {', '.join(METHODS())}")

    def settings(self) -> dict[str, Any]:
        return {}

    def start(self, context: Round) -> tuple[Any, bool]:
        from cleanprior.learning.gaussian import fit_gaussian

        config, data = context.config, context.data
        path = context.run / "gaussian.pt"
        if path.exists():
            gaussian = _load_gaussian(path)
        else:
            gaussian = fit_gaussian(
                data.y, data.operator, data.noise_std, context.shape, rank=config.gaussian_rank or None,
                iterations=config.gaussian_iterations, samples=config.gaussian_samples,
                generator=round_generator(config.seed, 2, device=context.device),
                progress=context.progress and distributed.is_main(),
            )
            if distributed.is_main():
                _save_gaussian(path, gaussian, context.description)
            distributed.barrier()
        self.gaussian = gaussian.to(context.device)
        return self.gaussian, True

    def e_step(self, context: Round, k: int, prior: Any, exact: bool, options: dict[str, Any] | None = None,
               config: EMConfig | None = None) -> tuple[Tensor, float]:
        """Posterior samples of round ``k`` for every observation, and the seconds they took."""
        began = time.perf_counter()
        x = posterior_batches(
            prior, context.data, config=config or context.config, samples=context.config.samples, seed_keys=(3, k),
            folder=context.folder(k) / "estep", exact=exact, progress=context.progress, desc=f"round {k} E-step",
            options=options,
        )
        if not torch.isfinite(x).all():
            raise FloatingPointError(f"round {k}: the E-step produced non-finite samples")
        return x, time.perf_counter() - began

    def round(self, context: Round, k: int, prior: Any) -> tuple[PreconditionedDenoiser, dict[str, Any]]:
        exact = prior is self.gaussian
        x, seconds = self.e_step(context, k, prior, exact)
        denoiser, row = m_step(context, k, x, None if exact else prior, self.name)
        return denoiser, dict(row, estep_seconds=seconds)

    def restore(self, context: Round, k: int) -> PreconditionedDenoiser:
        # the completed round's own EMA weights (RUN/checkpoint.pt may already hold a later
        # round's, if the process died between its M-step and the end of its round)
        return load_denoiser(context.folder(k) / "train.pt", device=context.device)

    def evaluate(self, context: Round, k: int, prior: Any) -> dict[str, Any]:
        return {}


def fit_em(
    observations: Any,
    run: str | os.PathLike[str],
    *,
    network: Any = None,
    config: EMConfig | None = None,
    training: TrainConfig | None = None,
    evaluation: EvalConfig | None = None,
    device: str | torch.device = "cpu",
    resume: bool = False,
    progress: bool = True,
    description: str = "",
) -> EMResult:
    """Learn a diffusion prior from observations by DiEM's expectation-maximization.

    Arguments:
        observations: An :class:`~cleanprior.data.files.Observations` (``y``, per-item operator,
            noise level, optionally the clean ``x`` for evaluation only).
        run: The run folder.
        network: A :class:`~cleanprior.runs.prior.NetworkConfig` (the default U-Net for images, an
            MLP for vectors).
        config: The rounds' options.
        training: The M-step's options (each round trains ``training.steps`` steps).
        evaluation: What is measured and drawn after every round.
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``, ``"cuda:N"`` (under ``torchrun``,
            each rank its GPU).
        resume: Continue the run in ``run`` (its configuration must match, except ``rounds``,
            which may grow).
        progress: Show progress bars.
        description: What the observations are (recorded in checkpoints and the report).

    Returns:
        The last denoiser, the Gaussian start and the metrics of every round.

    Raises:
        FileExistsError: If ``run`` holds a run and ``resume`` is False (nothing is touched).
        ValueError: If resuming with another configuration, or for invalid options (before any
            work).
    """
    from cleanprior.runs.prior import NetworkConfig

    config = config or EMConfig()
    method = DiEM()
    prior, gaussian, metrics = run_rounds(
        method, observations, pathlib.Path(run), config=config, network=network or NetworkConfig(),
        training=training or TrainConfig(steps=2000, batch_size=128), evaluation=evaluation or EvalConfig(),
        device=device, resume=resume, progress=progress, description=description,
    )
    return EMResult(None if prior is gaussian else prior, gaussian, metrics)
