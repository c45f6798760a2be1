r"""Benchmark of posterior sampling against the exact posterior, side by side with azula.

What is measured, and how:

- **Prior and tasks.** Every method runs on the exact :class:`cleanprior.GaussianMixture`
  denoiser, so the only error is the method's. Tasks (noise std 0.05 everywhere):

  * ``manifold``: DiEM's random 1-D manifold in 5-D (``manifold_prior(features=5)``, 256 thin
    components), seen through a random 2x5 projection per observation
    (``Matrix(random_projection(2, 5, batch=B))``);
  * ``inpaint``, ``downsample``, ``blur``: a 64-D mixture of 256 isotropic components of std 0.1
    centred on scikit-learn digits (``digits()`` train images, 1x8x8 in [-1, 1]), seen through
    a random 50 % mask per observation, 2x average downsampling, and a circular Gaussian blur of
    std 1 pixel.

  The ground truths are prior samples, ``y = A(x) + 0.05 z``. Each operator's dense matrix
  (per observation where its parameters are) is built by applying it to the identity basis in
  float64, and ``prior.posterior(A_i, y_i, 0.05)`` gives each observation's exact posterior: its
  mean, a reference set of exact samples, and a second, independent exact set.
- **Accuracy.** For each observation, the method draws ``samples`` posterior samples (one batch
  of ``observations x samples``, every observation repeated); the table gives the Sinkhorn
  divergence (``cleanprior.metrics.sinkhorn_divergence``, blur 0.05) to the reference set,
  averaged over observations, and its ratio to the "floor": the same average between the two
  exact sets, which is what a perfect sampler scores at these sizes. "Mean RMSE" is the RMS
  over observations and pixels of the samples' mean minus the exact posterior mean; its floor
  (in the header row of each task) is the same error for the second exact set.
- **Cost.** The denoiser is wrapped in a counter of the rows it is evaluated on and of the rows
  of every vector-Jacobian product taken through it (an identity autograd function on its
  output counts its backward calls), so "evals/sample" and "VJPs/sample" are measured the same
  way for every method, ours and azula's. "s/sample" is the wall time of the sampling call
  divided by the number of samples; "other load" is the CPU cores other processes kept busy
  during the call (see ``bench_core.py``).
- **Methods.** Every name in ``cleanprior.posterior.METHODS()``, with the options of
  ``METHOD_OPTIONS`` (a method missing from it runs with its defaults), through
  :func:`cleanprior.sample_posterior` with the default ``ddim`` sampler (eta 0) on the default
  EDM grid. A method that needs a pseudo-inverse is skipped on operators without one (blur).
- **azula** (the DiEM authors' library): our mixture denoiser is wrapped as an
  ``azula.denoise.Denoiser`` with ``VESchedule(SIGMA_MIN, SIGMA_MAX)`` (alpha_t = 1, so
  ``sigma = sigma_t`` and the mean is our denoiser's output; MMPS and TDS read only ``.mean``).
  ``MMPSDenoiser`` (CG, 1 and 3 iterations, ``cov_y`` isotropic 0.05^2) runs under azula's
  ``DDIMSampler`` (eta 0) with the same steps; the operator is flattened to ``(B, m)`` because
  azula's solvers reduce over the last dimension. ``TDSSampler`` runs once per observation
  with its ``samples`` particles, twist ``log N(y; A x_hat, (0.05^2 + sigma_t^2) I)``. azula's
  grid is geometric in sigma from sigma_max down to sigma_min (it never denoises at the last
  level), ours the EDM grid to 0; the row ``mmps (cg 1, geometric grid)`` isolates the grid.
  Each azula row gives the ratio of our counterpart's floor ratio to azula's (< 1: ours is more
  accurate).

Randomness comes from ``torch.Generator``s seeded per task and per run, identically for every
method; initial noise is drawn from them for azula's samplers too. azula's TDS draws from the
global generator (``torch.multinomial``, ``Normal.sample``), so it runs inside
``torch.random.fork_rng()`` seeded from the benchmark's generator, which leaves the global state
as it was.

Usage::

    .venv/bin/python benchmarks/bench_posterior.py [--quick] [--tasks manifold,blur]
        [--methods mmps,dps] [--threads 2] [--output PATH]

The results are printed and appended to ``--output`` as a new section headed with the date.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from azula.denoise import Denoiser as AzulaDenoiser
from azula.denoise import DiracPosterior
from azula.guidance import MMPSDenoiser, TDSSampler
from azula.linalg.covariance import IsotropicCovariance
from azula.noise import VESchedule
from azula.sample import DDIMSampler
from bench_core import LoadMeter, fmt_load, machine_lines, markdown_table, sig3
from torch import Tensor

from cleanprior import GaussianMixture, sample_posterior
from cleanprior.data import digits, manifold_prior
from cleanprior.diffusion.schedules import SIGMA_MAX, SIGMA_MIN
from cleanprior.metrics import sinkhorn_divergence
from cleanprior.operators import Blur, Downsample, Mask, Matrix, Operator, gaussian_kernel, random_mask, random_projection
from cleanprior.posterior import METHODS
from cleanprior.posterior.smc import systematic_resample

NOISE_STD = 0.05
DIGIT_COMPONENTS = 256
DIGIT_STD = 0.1
TASKS = ("manifold", "inpaint", "downsample", "blur")

METHOD_OPTIONS: dict[str, tuple[tuple[str, dict[str, Any]], ...]] = {
    "dps": (("widened likelihood", {}),),
    "mmps": (
        ("cg 1", {"iterations": 1}),
        ("cg 3", {"iterations": 3}),
        ("cg 1, geometric grid", {"iterations": 1, "grid": "exponential"}),
    ),
    "pc": (("mmps cg 1, 1 correction", {"iterations": 1, "corrections": 1}),),
    "pigdm": (("cg 3", {}),),
    "sda": (("cg 3", {}),),
    "tmpd": (("cg 3", {}),),
    "tds": (("dps twist, 8 particles", {"particles": 8, "twist": "dps"}),),
}
"""Per method: (label, options of ``sample_posterior``) for each row."""

TDS_FACTOR = 4
"""A second TDS row with this many particles per draw (up to 64 steps): more particles, closer to
the exact posterior, at this factor's cost."""

MAX_STEPS = {("tds", "dps twist, 8 particles"): 64}
"""Rows skipped above this many steps: 8 independent particles per draw cost 8x the others."""

NEEDS_PINV = {"ilvr", "mcg"}
"""Methods that apply ``A.pinv``; they are skipped on operators without one (``dc`` runs in its
default gradient mode, which needs only the adjoint)."""

AZULA_COUNTERPARTS: dict[tuple[str, str], str] = {
    ("mmps", "cg 1"): "azula MMPS cg 1",
    ("mmps", "cg 3"): "azula MMPS cg 3",
    ("tds", "dps twist, one system per observation"): "azula TDS",
}
"""Our row (method, label) -> the azula row it is compared with."""


@dataclasses.dataclass(frozen=True)
class Plan:
    """Sizes of one run.

    Attributes:
        observations: Observations per task.
        samples: Posterior samples per observation (and size of each exact set).
        steps: The step counts.
    """

    observations: int
    samples: int
    steps: tuple[int, ...]


FULL = Plan(observations=4, samples=64, steps=(16, 64, 256))
QUICK = Plan(observations=2, samples=64, steps=(16, 64))


class _CountBackward(torch.autograd.Function):
    """The identity, counting the rows of the vector-Jacobian products that pass through it."""

    @staticmethod
    def forward(ctx: Any, counter: CountingDenoiser, x: Tensor) -> Tensor:
        ctx.counter = counter
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, Tensor]:
        ctx.counter.vjp_rows += grad.shape[0]
        return None, grad


class CountingDenoiser:
    """A denoiser that counts the rows it evaluates and the rows of the VJPs taken through it."""

    def __init__(self, denoiser: Callable[[Tensor, Tensor], Tensor]) -> None:
        self.denoiser = denoiser
        self.rows = 0
        self.vjp_rows = 0

    def reset(self) -> None:
        self.rows = 0
        self.vjp_rows = 0

    def __call__(self, x_t: Tensor, sigma: Tensor) -> Tensor:
        self.rows += x_t.shape[0]
        d = self.denoiser(x_t, sigma)
        return _CountBackward.apply(self, d) if d.requires_grad else d


class AzulaMixtureDenoiser(AzulaDenoiser):
    """Our denoiser ``D(x_t, sigma)`` as an azula denoiser on the VE schedule ``alpha_t = 1``."""

    def __init__(self, denoiser: CountingDenoiser, sigma_min: float, sigma_max: float) -> None:
        super().__init__()
        self.denoiser = denoiser
        self.schedule = VESchedule(sigma_min, sigma_max)

    def forward(self, x_t: Tensor, t: Tensor, **kwargs: Any) -> DiracPosterior:
        alpha_t, sigma_t = self.schedule(t)
        sigma = (sigma_t / alpha_t).to(x_t.dtype).expand(x_t.shape[0])
        return DiracPosterior(mean=self.denoiser(x_t / alpha_t, sigma))


@dataclasses.dataclass
class Task:
    """One inverse problem with its exact posteriors.

    Attributes:
        name: The task's name.
        description: What it is, for the table.
        prior: The prior.
        operator: ``operator(repeats, index)``: the operator for a batch in which every
            observation (or only observation ``index``, when given) is repeated ``repeats``
            times consecutively.
        y: Observations, shape ``(observations, *y_shape)``.
        posteriors: The exact posterior of each observation.
        means: Exact posterior means, shape ``(observations, d)``.
        reference: Exact samples, ``(observations, samples, d)``.
        second: Independent exact samples, same shape.
    """

    name: str
    description: str
    prior: GaussianMixture
    operator: Callable[[int, int | None], Operator]
    y: Tensor
    posteriors: list[GaussianMixture]
    means: Tensor
    reference: Tensor
    second: Tensor

    @property
    def has_pinv(self) -> bool:
        return bool(getattr(self.operator(1, None), "has_pinv", False))


def dense_matrices(operator: Operator, shape: tuple[int, ...], batch: int) -> Tensor:
    """The matrix of a linear operator for each of ``batch`` observations, ``(batch, m, d)``, float64."""
    d = math.prod(shape)
    basis = torch.eye(d, dtype=torch.float64).reshape(d, *shape)
    columns = [operator(basis[j].expand(batch, *shape)).reshape(batch, -1) for j in range(d)]
    return torch.stack(columns, dim=-1)


def pick(parameters: Tensor, index: int | None) -> Tensor:
    """All per-observation parameters, or those of observation ``index`` (batch dimension kept)."""
    return parameters if index is None else parameters[index : index + 1]


def digit_prior(generator: torch.Generator) -> GaussianMixture:
    """A uniform mixture of isotropic Gaussians centred on digit images."""
    images = digits("train")
    chosen = torch.randperm(images.shape[0], generator=generator)[:DIGIT_COMPONENTS]
    return GaussianMixture.isotropic(images[chosen].reshape(DIGIT_COMPONENTS, -1), DIGIT_STD, shape=(1, 8, 8))


def build_task(name: str, plan: Plan, seed: int) -> Task:
    """Draw the prior, ground truths, operators, observations and exact posterior sets of a task."""
    generator = torch.Generator().manual_seed(seed)
    n = plan.observations
    operator: Callable[[int, int | None], Operator]
    if name == "manifold":
        prior = manifold_prior(features=5)
        matrices = random_projection(2, 5, batch=n, generator=generator)
        operator = lambda repeats, index: Matrix(pick(matrices, index).repeat_interleave(repeats, 0))  # noqa: E731
        description = "1-D manifold in 5-D, random 2x5 projection per observation"
    else:
        prior = digit_prior(generator)
        if name == "inpaint":
            masks = random_mask((1, 8, 8), 0.5, batch=n, generator=generator)
            operator = lambda repeats, index: Mask(pick(masks, index).repeat_interleave(repeats, 0))  # noqa: E731
            description = "digits 1x8x8, 50 % random pixels missing per observation"
        elif name == "downsample":
            shared = Downsample(2, "average")
            operator = lambda repeats, index: shared  # noqa: E731
            description = "digits 1x8x8, 2x average downsampling"
        elif name == "blur":
            shared = Blur(gaussian_kernel(1.0), "circular")
            operator = lambda repeats, index: shared  # noqa: E731
            description = "digits 1x8x8, circular Gaussian blur std 1"
        else:
            raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    x = prior.sample(n, generator)
    clean = operator(1, None)(x)
    y = clean + NOISE_STD * torch.randn(clean.shape, generator=generator)
    A = dense_matrices(operator(1, None), prior.shape, n)
    posteriors = [prior.posterior(A[i], y[i].reshape(-1).double(), NOISE_STD) for i in range(n)]
    means = torch.stack([(p.weights[:, None] * p.means).sum(0) for p in posteriors])
    reference = torch.stack([p.sample(plan.samples, generator).reshape(plan.samples, -1) for p in posteriors])
    second = torch.stack([p.sample(plan.samples, generator).reshape(plan.samples, -1) for p in posteriors])
    return Task(name, description, prior, operator, y, posteriors, means, reference.float(), second.float())


@dataclasses.dataclass
class Score:
    """Accuracy of one set of samples: Sinkhorn divergence and mean RMSE, averaged over observations."""

    sinkhorn: float
    rmse: float


def score(task: Task, samples: Tensor) -> Score:
    """Score ``samples`` of shape ``(observations, samples, d)`` against the exact posteriors."""
    divergences = [float(sinkhorn_divergence(samples[i], task.reference[i])) for i in range(samples.shape[0])]
    errors = (samples.double().mean(1) - task.means) ** 2
    return Score(sum(divergences) / len(divergences), float(errors.mean().sqrt()))


@dataclasses.dataclass
class Row:
    """One method at one step count on one task."""

    method: str
    label: str
    steps: int
    score: Score | None = None
    evals: float = math.nan
    vjps: float = math.nan
    seconds: float = math.nan
    load: float | None = None
    note: str = ""

    @property
    def name(self) -> str:
        return self.method if self.method.startswith("azula") else f"{self.method} ({self.label})"


def timed(
    row: Row, counter: CountingDenoiser, total: int, draw: Callable[[], Tensor]
) -> Tensor | None:
    """Run ``draw``, filling the row's cost and load; None (with a note) if it fails."""
    counter.reset()
    meter = LoadMeter()
    meter.start()
    began = time.perf_counter()
    try:
        out = draw()
    except NotImplementedError as error:
        row.note = f"skipped: {error}"
        return None
    except (FloatingPointError, RuntimeError, ValueError) as error:
        row.note = f"failed: {type(error).__name__}: {str(error)[:120]}"
        return None
    row.seconds = (time.perf_counter() - began) / total
    meter.stop()
    row.load = meter.cores
    row.evals = counter.rows / total
    row.vjps = counter.vjp_rows / total
    if not torch.isfinite(out).all():
        row.note = "non-finite samples"
        return None
    return out


def run_ours(task: Task, method: str, label: str, options: dict[str, Any], steps: int, plan: Plan, seed: int) -> Row:
    """Posterior samples of one of our methods, all observations in one batch."""
    row = Row(method, label, steps)
    if method in NEEDS_PINV and not task.has_pinv:
        row.note = "skipped: needs A.pinv, which this operator lacks"
        return row
    if steps > MAX_STEPS.get((method, label), steps):
        row.note = f"skipped above {MAX_STEPS[(method, label)]} steps (cost)"
        return row
    counter = CountingDenoiser(task.prior.denoiser)
    total = plan.observations * plan.samples
    y = task.y.repeat_interleave(plan.samples, 0)
    generator = torch.Generator().manual_seed(seed)

    def draw() -> Tensor:
        return sample_posterior(
            counter, task.operator(plan.samples, None), y, shape=task.prior.shape, noise_std=NOISE_STD,
            method=method, steps=steps, generator=generator, **options,
        )

    out = timed(row, counter, total, draw)
    if out is not None:
        row.score = score(task, out.reshape(plan.observations, plan.samples, -1))
    return row


def flat(operator: Operator) -> Callable[[Tensor], Tensor]:
    """The operator with its measurements flattened to ``(B, m)``, as azula's solvers expect."""
    return lambda x: operator(x).reshape(x.shape[0], -1)


def run_azula_mmps(task: Task, iterations: int, steps: int, plan: Plan, seed: int) -> Row:
    """azula's MMPS denoiser under its DDIM sampler, all observations in one batch."""
    row = Row(f"azula MMPS cg {iterations}", "", steps)
    counter = CountingDenoiser(task.prior.denoiser)
    total = plan.observations * plan.samples
    wrapped = AzulaMixtureDenoiser(counter, SIGMA_MIN, SIGMA_MAX)
    y = task.y.repeat_interleave(plan.samples, 0).reshape(total, -1)
    guided = MMPSDenoiser(
        wrapped, y, flat(task.operator(plan.samples, None)), IsotropicCovariance(NOISE_STD**2),
        solver="cg", iterations=iterations,
    )
    sampler = DDIMSampler(guided, eta=0.0, steps=steps, silent=True)
    generator = torch.Generator().manual_seed(seed)

    def draw() -> Tensor:
        return sampler(SIGMA_MAX * torch.randn((total, *task.prior.shape), generator=generator))

    out = timed(row, counter, total, draw)
    if out is not None:
        row.score = score(task, out.reshape(plan.observations, plan.samples, -1))
    return row


def run_azula_tds(task: Task, steps: int, plan: Plan, seed: int) -> Row:
    """azula's TDS sampler, once per observation with ``samples`` particles."""
    row = Row("azula TDS", "", steps)
    counter = CountingDenoiser(task.prior.denoiser)
    wrapped = AzulaMixtureDenoiser(counter, SIGMA_MIN, SIGMA_MAX)
    generator = torch.Generator().manual_seed(seed)

    def draw() -> Tensor:
        sets = []
        for i in range(plan.observations):
            y_i = task.y[i : i + 1].reshape(1, -1)
            operator = flat(task.operator(1, i))

            def twist(x_hat: Tensor, sigma: Tensor, y_i: Tensor = y_i, operator: Callable[[Tensor], Tensor] = operator) -> Tensor:
                return -((y_i - operator(x_hat)) ** 2) / (2 * (NOISE_STD**2 + sigma**2))

            sampler = TDSSampler(wrapped, twist, steps=steps, silent=True)
            x_T = SIGMA_MAX * torch.randn((plan.samples, *task.prior.shape), generator=generator)
            global_seed = int(torch.randint(2**62, (), generator=generator))
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(global_seed)
                sets.append(sampler(x_T))
        return torch.cat(sets)

    out = timed(row, counter, plan.observations * plan.samples, draw)
    if out is not None:
        row.score = score(task, out.reshape(plan.observations, plan.samples, -1))
    return row


def run_ours_tds_system(task: Task, steps: int, plan: Plan, seed: int, factor: int = 1) -> Row:
    """Our TDS run as azula's is: once per observation with ``factor x samples`` particles, from
    which ``samples`` draws are taken by systematic resampling on the final weights (with factor 1,
    every particle is drawn, as azula does, and both cost the same per draw)."""
    label = "dps twist, one system per observation" if factor == 1 else f"dps twist, {factor} particles per draw"
    row = Row("tds", label, steps)
    counter = CountingDenoiser(task.prior.denoiser)
    generator = torch.Generator().manual_seed(seed)

    def draw() -> Tensor:
        _, info = sample_posterior(
            counter, task.operator(1, None), task.y, shape=task.prior.shape, noise_std=NOISE_STD,
            method="tds", steps=steps, generator=generator, particles=factor * plan.samples, twist="dps",
            return_info=True,
        )
        weights = torch.softmax(info["log_weights"], 1)
        rows = systematic_resample(weights, generator)
        if factor > 1:
            # systematic resampling returns sorted ancestors: spread the draws over all of them
            picked = torch.randperm(rows.shape[1], generator=generator)[: plan.samples]
            rows = rows[:, picked]
        return torch.stack([info["particles"][i, rows[i]] for i in range(plan.observations)]).flatten(0, 1)

    out = timed(row, counter, plan.observations * plan.samples, draw)
    if out is not None:
        row.score = score(task, out.reshape(plan.observations, plan.samples, -1))
    return row


def method_rows(methods: Sequence[str]) -> list[tuple[str, str, dict[str, Any]]]:
    """(method, label, options) for every row of our methods."""
    rows = []
    for method in methods:
        for label, options in METHOD_OPTIONS.get(method, (("defaults", {}),)):
            rows.append((method, label, options))
    return rows


def fmt(value: float) -> str:
    return "n/a" if not math.isfinite(value) else sig3(value) if value > 0 else f"{value:g}"


def task_table(task: Task, rows: list[Row], floor: Score) -> str:
    """The Markdown table of one task."""
    by_name = {(r.name, r.steps): r for r in rows}
    headers = [
        "method", "steps", "Sinkhorn", "/ floor", "mean RMSE", "evals/sample", "VJPs/sample",
        "ms/sample", "other load", "vs ours", "note",
    ]
    lines = [["exact vs exact (floor)", "", fmt(floor.sinkhorn), "1", fmt(floor.rmse), "", "", "", "", "", ""]]
    for r in rows:
        cells = [r.name, str(r.steps)]
        if r.score is None:
            cells += ["", "", ""]
        else:
            cells += [fmt(r.score.sinkhorn), f"{r.score.sinkhorn / floor.sinkhorn:.2f}", fmt(r.score.rmse)]
        cells += [fmt(r.evals), fmt(r.vjps), fmt(1e3 * r.seconds), fmt_load(r.load)]
        versus = ""
        for (method, label), azula in AZULA_COUNTERPARTS.items():
            ours = by_name.get((f"{method} ({label})", r.steps))
            if r.method == azula and ours is not None and ours.score and r.score:
                versus = f"{ours.score.sinkhorn / r.score.sinkhorn:.2f}x Sinkhorn, {ours.seconds / r.seconds:.2f}x time"
        cells += [versus, r.note]
        lines.append(cells)
    return markdown_table(headers, lines)


def target_lines(task: Task, rows: list[Row], floor: Score) -> list[str]:
    """How close each target is on one task."""
    lines = []
    by_name = {(r.name, r.steps): r for r in rows}
    for iterations in (1, 3):
        for steps in sorted({r.steps for r in rows}):
            ours = by_name.get((f"mmps (cg {iterations})", steps))
            theirs = by_name.get((f"azula MMPS cg {iterations}", steps))
            if ours and theirs and ours.score and theirs.score:
                accurate = ours.score.sinkhorn <= theirs.score.sinkhorn
                cheap = ours.evals + ours.vjps <= theirs.evals + theirs.vjps
                lines.append(
                    f"- MMPS cg {iterations}, {steps} steps: Sinkhorn ours/azula "
                    f"{ours.score.sinkhorn / theirs.score.sinkhorn:.2f} ({'met' if accurate else 'NOT met'}), "
                    f"evals+VJPs per sample {fmt(ours.evals + ours.vjps)} vs {fmt(theirs.evals + theirs.vjps)} "
                    f"({'met' if cheap else 'NOT met'}), time ours/azula {ours.seconds / theirs.seconds:.2f}"
                )
    at_64 = [r for r in rows if r.steps == 64 and r.score and not r.method.startswith("azula")]
    if at_64:
        best = min(at_64, key=lambda r: r.score.sinkhorn)  # type: ignore[union-attr]
        ratio = best.score.sinkhorn / floor.sinkhorn  # type: ignore[union-attr]
        lines.append(
            f"- Best of ours at 64 steps: {best.name}, {ratio:.2f}x the floor "
            f"(target 3x: {'met' if ratio <= 3 else 'NOT met'})"
        )
    return lines


def run(plan: Plan, tasks: Sequence[str], methods: Sequence[str], seed: int) -> str:
    """Every task, method and step count; returns the Markdown section."""
    began = time.perf_counter()
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"## Posterior sampling, {date}", "", *machine_lines(torch.device("cpu"))]
    lines += [
        f"- Sizes: {plan.observations} observations x {plan.samples} samples per task; steps "
        f"{', '.join(map(str, plan.steps))}; noise std {NOISE_STD}; seed {seed}",
        f"- Methods registered: {', '.join(METHODS())}; run: {', '.join(methods)}",
        "",
    ]
    for t, name in enumerate(tasks):
        print(f"task {name} ...", file=sys.stderr)
        task = build_task(name, plan, seed + 1000 * t)
        floor = Score(
            sum(float(sinkhorn_divergence(task.second[i], task.reference[i])) for i in range(plan.observations))
            / plan.observations,
            float(((task.second.double().mean(1) - task.means) ** 2).mean().sqrt()),
        )
        rows: list[Row] = []
        for steps in plan.steps:
            run_seed = seed + 1000 * t + steps
            for method, label, options in method_rows(methods):
                rows.append(run_ours(task, method, label, options, steps, plan, run_seed))
                print(f"  {rows[-1].name} {steps}: {rows[-1].note or 'ok'}", file=sys.stderr)
            for iterations in (1, 3):
                rows.append(run_azula_mmps(task, iterations, steps, plan, run_seed))
            if "tds" in methods:
                rows.append(run_ours_tds_system(task, steps, plan, run_seed))
                if TDS_FACTOR > 1 and steps <= 64:
                    rows.append(run_ours_tds_system(task, steps, plan, run_seed, TDS_FACTOR))
            rows.append(run_azula_tds(task, steps, plan, run_seed))
        lines += [f"### `{name}`: {task.description}", "", task_table(task, rows, floor), ""]
        lines += ["Targets:", "", *target_lines(task, rows, floor), ""]
    load = " / ".join(f"{v:.2f}" for v in os.getloadavg())
    total = time.perf_counter() - began
    lines += [f"Total time {total:.0f} s; load average (1 / 5 / 15 min) at the end: {load}.", ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="fewer observations and samples, steps 16 and 64")
    parser.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated, from {', '.join(TASKS)}")
    parser.add_argument("--methods", default=None, help="comma-separated, from METHODS() (default: all)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--seed", type=int, default=0, help="base seed of the generators")
    parser.add_argument("--steps", default=None, help="comma-separated step counts (default: the plan's)")
    parser.add_argument(
        "--output",
        type=Path,
        default=Path(__file__).resolve().parent / "RESULTS.md",
        help="Markdown file the results are appended to (default benchmarks/RESULTS.md)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    tasks = [t for t in args.tasks.split(",") if t]
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        parser.error(f"unknown tasks {unknown}; known: {', '.join(TASKS)}")
    methods = METHODS() if args.methods is None else [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS()))
    if unknown:
        parser.error(f"unknown methods {unknown}; known: {', '.join(METHODS())}")
    plan = QUICK if args.quick else FULL
    if args.steps:
        plan = dataclasses.replace(plan, steps=tuple(int(v) for v in args.steps.split(",") if v))
    section = run(plan, tasks, methods, args.seed)
    print(section)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    with args.output.open("a") as out:
        out.write("\n" + section)


if __name__ == "__main__":
    main()
