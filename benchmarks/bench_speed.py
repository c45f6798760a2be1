r"""Speed benchmark: our training loop against a bare PyTorch loop, sampler overhead, E-step and a DiEM round.

Issue 14, item 5. What is measured, and how:

1. **Training steps per second** of two networks, ``PreconditionedDenoiser(UNet(...),
   sigma_data=0.5)`` built by :func:`cleanprior.runs.prior.default_network`: the demo's U-Net
   (channels (16, 32, 64), 1 block per level, as ``cleanprior demo`` / ``make demo`` trains it)
   and the default U-Net (channels (32, 64, 128), 2 blocks, attention at the coarsest level), on
   ``mnist5k("train")`` (4,500 images of 1x28x28 in [-1, 1]) held on the device.

   - *ours*: :func:`cleanprior.train` with ``TrainConfig(steps=..., batch_size=B,
     progress=False)`` and its defaults otherwise (AdamW lr 1e-3 with the cosine schedule,
     clipping 1.0, EMA 0.999, lognormal levels, losses read every 50 steps, bf16 autocast on CUDA
     only, fused AdamW on CUDA and foreach elsewhere). Its callback is called only at the loss
     reads, so single steps cannot be stamped: each repeat times one whole call of ``W + N``
     steps and one of ``W`` steps on the same network, and a step costs their difference over
     ``N``. The set-up of a call (the probe, the EMA copy, the final read and snapshot) cancels
     out; everything per step stays in, the reads every 50 steps included.
   - *bare*: a loop written in this script: the same network (built from the same seed), loss
     (the EDM-weighted denoising loss :math:`(1/\sigma^2 + 1/\sigma_d^2)\,
     \mathrm{mean}((D(x + \sigma\epsilon, \sigma) - x)^2)` with :math:`\log\sigma \sim
     \mathcal{N}(-1.2, 1.2^2)`), batch, AdamW (the same fused/foreach choice and autocast as
     ours), clipping 1.0 and a ``torch._foreach_lerp_`` EMA; indices, levels and noise drawn on
     the device and the losses kept on the device until one read at the end. ``W`` untimed
     steps, then ``N`` timed ones.
   - *bare, compiled*: the same loop with ``torch.compile(denoiser)`` (the second reference;
     the first warm-up step, which compiles, is reported apart), and *ours, compiled* with
     ``TrainConfig(compile=True)``. Only with ``--compile on`` (the default on CUDA); a failed
     compilation is reported as "n/a" with its reason.

   Each loop is repeated (interleaved, every other repeat in the opposite order, so that a change
   of load hits every loop alike) and the
   table gives the median steps/s, the range over the repeats and ours / bare (goal: at least
   0.9).
2. **Sampler overhead**: one call of :func:`cleanprior.sample_prior` (``n = batch``,
   ``steps=64``, ``ddim``, and ``ddpm`` = ``eta=1``) against the same number of bare denoiser
   calls on a batch of the same size at the grid's levels (levels built beforehand), both under
   ``torch.inference_mode()``, on the untrained networks (the cost does not depend on the
   weights), interleaved and every other repeat in the opposite order. A counting wrapper
   checks once that the sampler makes ``steps`` calls. Ratio sampler / bare calls, goal at
   most 1.05.
3. **E-step posterior samples per second**: :func:`cleanprior.sample_posterior` with the
   E-step's method and defaults (``EMConfig().posterior_options()``: MMPS, GMRES, 1 iteration,
   32 ``ddpm`` steps) on masked MNIST test images (75 % of the pixels missing, one random mask
   per observation, noise std 0.01), one call of ``batch`` observations after an untimed
   two-step call. Also the time per sample over ``steps`` bare forward calls per sample (what
   the guidance costs on top of the network: its vector-Jacobian products and the solver).
4. **One DiEM round, split**: :func:`cleanprior.learning.fit.fit` with ``method="diem"`` and the
   demo's E-step, network, training and evaluation options (``cleanprior demo``), scaled down to
   ``--diem-observations`` MNIST images with 75 % missing and a few training steps, two rounds
   (round 1's E-step samples the Gaussian start exactly; round 2's is the MMPS one of every
   later round). The seconds are those the run records in ``metrics.json``: ``start_seconds``,
   ``estep_seconds``, ``mstep_seconds`` (the whole ``train`` call, set-up and checkpoints
   included), ``eval_seconds`` and ``round_seconds`` (E-step + M-step). The Frechet distance's
   classifier is trained (or loaded from its cache) before the run, outside the timings.

Every timed row also gives the "other load" (the CPU cores other processes kept busy, see
``bench_core.py``). On a shared CPU it moves timings several-fold: compare ratios, whose two sides
ran interleaved, rather than absolute figures across runs. On CUDA the device is synchronised
before every clock reading.

Usage::

    .venv/bin/python benchmarks/bench_speed.py [--device cpu|cuda|auto] [--quick] [--threads 1]
        [--compile auto|on|off] [--networks demo,default] [--skip diem,...] [--output PATH]

The results are printed and appended to ``--output`` (default ``benchmarks/RESULTS_SPEED.md``)
as a new section headed with the date and the machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_core import (
    CountingDenoiser,
    LoadMeter,
    fmt_load,
    machine_lines,
    markdown_table,
    sig3,
    synchronize,
    time_ours,
)

from cleanprior import (
    PreconditionedDenoiser,
    TrainConfig,
    get_sampler,
    sample_posterior,
    sample_prior,
    train,
)
from cleanprior.data import mnist5k
from cleanprior.diffusion.schedules import make_grid
from cleanprior.runs.prior import NetworkConfig, default_network

IMAGE_SHAPE = (1, 28, 28)
NETWORKS = {
    # the network ``cleanprior demo`` (``make demo``) learns: commands.demo's NetworkConfig
    "demo": ("demo U-Net (16, 32, 64), 1 block", NetworkConfig(channels=(16, 32, 64), blocks=1)),
    "default": ("default U-Net (32, 64, 128), 2 blocks", NetworkConfig()),
}
TRAIN_GOAL = 0.9
SAMPLER_GOAL = 1.05
MISSING = 0.75
NOISE_STD = 0.01
RESULTS = Path(__file__).resolve().parent / "RESULTS_SPEED.md"
PREAMBLE = """\
Appended to by `benchmarks/bench_speed.py` (issue 14, item 5), one section per run headed by its
date and machine; the script's docstring says exactly how each figure is measured.

- **Training**: optimiser steps per second of `cleanprior.train` ("ours", timed as the difference
  of a call of W + N steps and one of W steps, over N) and of a bare PyTorch loop written in the
  script with the same network, loss, batch, AdamW, clipping and EMA ("bare"); "compiled" rows
  use `torch.compile` on the denoiser. **Goal: ours / bare at least 0.9.**
- **Sampler overhead**: the time of a 64-step `sample_prior` call over the time of 64 bare calls
  of the same denoiser on a batch of the same size. **Goal: at most 1.05.**
- **E-step**: posterior samples per second of `sample_posterior` with the E-step's defaults
  (MMPS, GMRES, 1 iteration, 32 DDPM steps) on masked MNIST, and that time over the bare
  forward calls it contains.
- **DiEM round**: the E-step, M-step and evaluation seconds that `fit(method="diem")` records in
  `metrics.json`, on a small masked-MNIST run with the demo's options.

"Other load" is the CPU cores other processes kept busy during a row: on a small shared machine
it changes absolute timings several-fold, so read the ratios (both sides ran interleaved).
"""


@dataclasses.dataclass(frozen=True)
class Plan:
    """How much to measure.

    Attributes:
        train_batch: Samples per training step.
        train: Per network key, ``(warm-up steps W, timed steps N, repeats)``.
        sample_networks: Networks of the sampler-overhead rows.
        sample_batch: Samples per sampler call.
        sample_steps: Sampler steps (64 for the figure of the issue).
        samplers: Samplers timed (``ddim``; ``ddpm`` is ``ddim`` with ``eta=1``).
        sample_repeats: Sampler calls (and bare-call runs) per row.
        estep_networks: Networks of the E-step rows.
        estep_batch: Observations per E-step call.
        estep_steps: Sampler steps of the E-step (0: ``EMConfig``'s default).
        estep_repeats: Timed E-step calls per row.
        diem_observations: Observations of the DiEM run (held-out ones included).
        diem_heldout: Held-out observations (evaluation only).
        diem_train_steps: Training steps per M-step.
        diem_eval: The ``EvalConfig`` fields of the DiEM run.
    """

    train_batch: int
    train: tuple[tuple[str, int, int, int], ...]
    sample_networks: tuple[str, ...]
    sample_batch: int
    sample_steps: int
    samplers: tuple[str, ...]
    sample_repeats: int
    estep_networks: tuple[str, ...]
    estep_batch: int
    estep_steps: int
    estep_repeats: int
    diem_observations: int
    diem_heldout: int
    diem_train_steps: int
    diem_eval: dict[str, Any]


# the demo's evaluation (commands.demo) on fewer samples
DEMO_EVAL = {"prior_samples": 32, "posterior_samples": 1, "shown": 8, "steps": 16, "reference": "mnist5k"}
PLANS = {
    # about 7 min on 2 loaded CPU cores with --threads 1 (a U-Net step takes 1 to 5 s there)
    ("cpu", False): Plan(
        train_batch=64, train=(("demo", 2, 6, 3), ("default", 1, 2, 2)),
        sample_networks=("demo",), sample_batch=16, sample_steps=64, samplers=("ddim", "ddpm"), sample_repeats=2,
        estep_networks=("demo",), estep_batch=16, estep_steps=0, estep_repeats=1,
        diem_observations=128, diem_heldout=32, diem_train_steps=30, diem_eval=DEMO_EVAL,
    ),
    ("cuda", False): Plan(
        train_batch=256, train=(("demo", 20, 200, 3), ("default", 20, 100, 3)),
        sample_networks=("demo", "default"), sample_batch=64, sample_steps=64, samplers=("ddim", "ddpm"),
        sample_repeats=5,
        estep_networks=("demo", "default"), estep_batch=256, estep_steps=0, estep_repeats=3,
        diem_observations=576, diem_heldout=64, diem_train_steps=200,
        diem_eval={"prior_samples": 64, "posterior_samples": 2, "shown": 8, "steps": 16, "reference": "mnist5k"},
    ),
}
QUICK = Plan(
    train_batch=16, train=(("demo", 1, 2, 1), ("default", 1, 1, 1)),
    sample_networks=("demo",), sample_batch=4, sample_steps=16, samplers=("ddim", "ddpm"), sample_repeats=1,
    estep_networks=("demo",), estep_batch=4, estep_steps=8, estep_repeats=1,
    diem_observations=40, diem_heldout=8, diem_train_steps=4,
    diem_eval={"prior_samples": 8, "posterior_samples": 1, "shown": 4, "steps": 4, "reference": ""},
)
PARTS = ("train", "sampler", "estep", "diem")


def network(key: str, device: torch.device, seed: int = 0) -> PreconditionedDenoiser:
    """The network ``key`` of :data:`NETWORKS`, its initial weights drawn from ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return default_network(IMAGE_SHAPE, NETWORKS[key][1]).to(device)


def parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def median_range(values: Sequence[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


# --------------------------------------------------------------------------- training


class BareLoop:
    """The reference training loop: what one writes by hand for the same network, loss and batch.

    ``TrainConfig``'s defaults: AdamW at lr 1e-3 (fused on CUDA, foreach elsewhere, as ours),
    gradient clipping at 1.0, EMA 0.999, :math:`\\log\\sigma \\sim N(-1.2, 1.2^2)`, bf16 autocast
    where ``TrainConfig().autocast(device)`` says; data, draws and losses on the device.
    """

    def __init__(self, denoiser: PreconditionedDenoiser, data: Tensor, batch: int, *, compile: bool = False,
                 seed: int = 0) -> None:
        config = TrainConfig()
        self.device = data.device
        self.data = data
        self.batch = batch
        self.sigma_data = float(denoiser.sigma_data)
        self.p_mean, self.p_std, self.clip, self.decay = config.p_mean, config.p_std, config.clip, config.ema_decay
        self.amp = config.autocast(self.device)
        self.model = denoiser.train()
        self.forward: Callable[[Tensor, Tensor], Tensor] = torch.compile(denoiser) if compile else denoiser
        self.params = [p for p in denoiser.parameters() if p.requires_grad]
        fused = self.device.type == "cuda"
        self.optimizer = torch.optim.AdamW(self.params, lr=config.lr, weight_decay=config.weight_decay, fused=fused,
                                           foreach=None if fused else True)
        self.ema = [p.detach().clone() for p in self.params]
        self.generator = torch.Generator(self.device).manual_seed(seed)

    def step(self) -> Tensor:
        g, device, batch = self.generator, self.device, self.batch
        index = torch.randint(self.data.shape[0], (batch,), generator=g, device=device)
        sigma = torch.exp(self.p_mean + self.p_std * torch.randn(batch, generator=g, device=device))
        eps = torch.randn((batch, *self.data.shape[1:]), generator=g, device=device)
        x = self.data[index]
        s = sigma.view(-1, *([1] * (x.ndim - 1)))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.amp):
            error = self.forward(x + s * eps, sigma) - x
        weight = 1 / sigma**2 + 1 / self.sigma_data**2
        loss = (weight * error.float().pow(2).flatten(1).mean(1)).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.optimizer.step()
        with torch.no_grad():
            torch._foreach_lerp_(self.ema, self.params, 1 - self.decay)
        return loss.detach()

    def run(self, steps: int) -> list[float]:
        """``steps`` steps; the losses are read once, at the end (that read synchronises)."""
        return torch.stack([self.step() for _ in range(steps)]).tolist()


def time_bare(loop: BareLoop, warmup: int, steps: int) -> float:
    """Seconds per step of ``steps`` bare steps after ``warmup`` untimed ones."""
    loop.run(warmup)
    synchronize(loop.device)
    began = time.perf_counter()
    loop.run(steps)
    synchronize(loop.device)
    return (time.perf_counter() - began) / steps


@dataclasses.dataclass
class LoopTimes:
    label: str
    seconds: list[float] = dataclasses.field(default_factory=list)
    failed: str = ""
    note: str = ""


def training_rows(key: str, data: Tensor, batch: int, warmup: int, steps: int, repeats: int,
                  compile: bool) -> tuple[list[list[str]], list[str]]:
    """Ours against the bare loop (and both compiled) on network ``key``; the table rows and goal lines."""
    device = data.device
    label, _ = NETWORKS[key]
    loops = [LoopTimes("bare"), LoopTimes("ours")]
    bare = BareLoop(network(key, device), data, batch)
    ours = network(key, device)
    compiled: BareLoop | None = None
    ours_compiled: PreconditionedDenoiser | None = None
    if compile:
        loops += [LoopTimes("bare, compiled"), LoopTimes("ours, compiled (`TrainConfig(compile=True)`)")]
        try:
            compiled = BareLoop(network(key, device), data, batch, compile=True)
            synchronize(device)
            began = time.perf_counter()
            compiled.run(1)
            synchronize(device)
            loops[2].note = f"first step (compilation) {sig3(time.perf_counter() - began)} s"
            ours_compiled = network(key, device)
        except Exception as error:  # noqa: BLE001 - any compiler failure is reported, not raised
            reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:160]
            loops[2].failed = loops[3].failed = reason
            compiled = None
    # untimed first steps: one-off allocations, kernel choice
    bare.run(1)
    train(ours, data, TrainConfig(steps=1, batch_size=batch, progress=False), generator=torch.Generator(device).manual_seed(0))
    meter = LoadMeter()
    meter.start()
    for repeat in range(repeats):
        # every other repeat in the opposite order, so that neither loop always runs first
        order = (0, 1) if repeat % 2 == 0 else (1, 0)
        for which in order:
            if which == 0:
                loops[0].seconds.append(time_bare(bare, warmup, steps))
            else:
                loops[1].seconds.append(time_ours(ours, data, batch, warmup, steps))
        if compiled is not None and ours_compiled is not None:
            try:
                for which in order:
                    if which == 0:
                        loops[2].seconds.append(time_bare(compiled, warmup, steps))
                    else:
                        loops[3].seconds.append(time_ours(ours_compiled, data, batch, warmup, steps, compile=True))
            except Exception as error:  # noqa: BLE001
                loops[2].failed = loops[3].failed = f"{type(error).__name__}: {error}"[:160]
                compiled = None
        print(f"  {key} repeat {repeat + 1}/{repeats}: " + ", ".join(
            f"{loop.label.split(' (')[0]} {sig3(1 / loop.seconds[-1])} steps/s" for loop in loops if loop.seconds
            and len(loop.seconds) == repeat + 1 and loop.seconds[-1] > 0), file=sys.stderr)
    meter.stop()
    rows = []
    bare_rate = 1 / statistics.median(loops[0].seconds)
    for loop in loops:
        if loop.failed or not loop.seconds:
            rows.append([label, str(batch), loop.label, "n/a", "", "", "", loop.failed or "not run", fmt_load(meter.cores)])
            continue
        median, low, high = median_range(loop.seconds)
        rate = 1 / median if median > 0 else float("inf")
        spread = f"{sig3(1 / high)}–{sig3(1 / low)}" if low > 0 else "n/a (a negative difference: too few steps)"
        rows.append([
            label, str(batch), loop.label, f"{sig3(rate)}", spread, sig3(rate * batch), f"{rate / bare_rate:.2f}x",
            loop.note, fmt_load(meter.cores),
        ])
    goals = []
    ours_rate = 1 / statistics.median(loops[1].seconds)
    ratio = ours_rate / bare_rate
    goals.append(f"- {label}, batch {batch}: ours / bare = **{ratio:.2f}x** (goal at least {TRAIN_GOAL}x: "
                 f"{'met' if ratio >= TRAIN_GOAL else 'NOT met'}), {len(loops[0].seconds)} repeat(s) of "
                 f"{steps} timed steps after {warmup}")
    if compile and not loops[2].failed and loops[2].seconds:
        compiled_rate = 1 / statistics.median(loops[2].seconds)
        goals.append(f"- {label}, batch {batch}: ours / compiled bare = {ours_rate / compiled_rate:.2f}x")
    return rows, goals


def training_section(device: torch.device, plan: Plan, compile: bool, compile_note: str) -> list[str]:
    data = mnist5k("train").to(device)
    rows: list[list[str]] = []
    goals: list[str] = []
    for key, warmup, steps, repeats in plan.train:
        print(f"training {key} ...", file=sys.stderr)
        r, g = training_rows(key, data, plan.train_batch, warmup, steps, repeats, compile)
        rows += r
        goals += g
    headers = ["network", "batch", "loop", "steps/s (median)", "steps/s (range)", "samples/s", "vs bare", "note",
               "other load (cores)"]
    amp = "bf16 autocast" if TrainConfig().autocast(device) else "float32"
    lines = [
        f"### Training steps per second (MNIST 1x28x28, {amp}, `TrainConfig` defaults)", "",
        markdown_table(headers, rows), "", *goals,
    ]
    if compile_note:
        lines.append(f"- compiled loops: {compile_note}")
    return [*lines, ""]


# --------------------------------------------------------------------------- sampler overhead


def sampler_rows(key: str, device: torch.device, plan: Plan) -> tuple[list[list[str]], list[str]]:
    """``sample_prior`` against as many bare denoiser calls, per sampler of the plan."""
    label, _ = NETWORKS[key]
    denoiser = network(key, device).eval().requires_grad_(False)
    batch, steps = plan.sample_batch, plan.sample_steps
    x = torch.randn(batch, *IMAGE_SHAPE, generator=torch.Generator(device).manual_seed(0), device=device)
    levels = make_grid(steps).tolist()[:-1]
    sigmas = [torch.full((batch,), s, device=device) for s in levels]

    def bare() -> float:
        synchronize(device)
        began = time.perf_counter()
        with torch.inference_mode():
            for sigma in sigmas:
                denoiser(x, sigma)
        synchronize(device)
        return time.perf_counter() - began

    rows, goals = [], []
    with torch.inference_mode():
        denoiser(x, sigmas[0])  # warm-up
    for name in plan.samplers:
        options = {"eta": 1.0} if name == "ddpm" else {}
        sampler = "ddim" if name == "ddpm" else name
        evaluations = get_sampler(sampler, **options).evaluations(steps)
        counter = CountingDenoiser(denoiser)
        with torch.inference_mode():
            sample_prior(counter, batch, shape=IMAGE_SHAPE, steps=2, sampler=sampler, **options,
                         generator=torch.Generator(device).manual_seed(0))
        counted = counter.calls
        generator = torch.Generator(device).manual_seed(1)

        def sample(sampler: str = sampler, options: dict[str, Any] = options,
                   generator: torch.Generator = generator) -> float:
            synchronize(device)
            began = time.perf_counter()
            with torch.inference_mode():
                sample_prior(denoiser, batch, shape=IMAGE_SHAPE, steps=steps, sampler=sampler, generator=generator,
                             **options)
            synchronize(device)
            return time.perf_counter() - began

        sampled, bares = [], []
        meter = LoadMeter()
        meter.start()
        for repeat in range(plan.sample_repeats):
            # every other repeat in the opposite order, so that neither side always runs first
            if repeat % 2 == 0:
                bares.append(bare())
                sampled.append(sample())
            else:
                sampled.append(sample())
                bares.append(bare())
        meter.stop()
        ratio = statistics.median(sampled) / statistics.median(bares)
        # each repeat's own ratio too: its two sides ran back to back, under the same load
        pairs = [s / b for s, b in zip(sampled, bares)]
        shown = name if name != "ddpm" else "ddpm (`ddim`, `eta=1`)"
        rows.append([
            label, shown, str(batch), str(steps),
            str(evaluations) if counted == get_sampler(sampler, **options).evaluations(2) else f"**{counted}** (mismatch)",
            sig3(statistics.median(sampled)), sig3(statistics.median(bares)), f"**{ratio:.3f}**",
            f"{min(pairs):.3f}–{max(pairs):.3f}", fmt_load(meter.cores),
        ])
        goals.append(f"- {label}, {name}, batch {batch}: sampler / bare calls = **{ratio:.3f}** (goal at most "
                     f"{SAMPLER_GOAL}: {'met' if ratio <= SAMPLER_GOAL else 'NOT met'})")
        print(f"  {key} {name}: sampler {sig3(statistics.median(sampled))} s, bare {sig3(statistics.median(bares))} s",
              file=sys.stderr)
    return rows, goals


def sampler_section(device: torch.device, plan: Plan) -> list[str]:
    rows: list[list[str]] = []
    goals: list[str] = []
    for key in plan.sample_networks:
        print(f"sampler overhead {key} ...", file=sys.stderr)
        r, g = sampler_rows(key, device, plan)
        rows += r
        goals += g
    headers = ["network (untrained)", "sampler", "batch", "steps", "evaluations", "sample_prior s (median)",
               "bare calls s (median)", "ratio", "ratio per repeat", "other load (cores)"]
    return [
        (f"### Sampler overhead (`sample_prior`, {plan.sample_steps} steps, vs as many bare denoiser calls, "
         f"{plan.sample_repeats} repeat(s))"), "",
        markdown_table(headers, rows), "", *goals, "",
    ]


# --------------------------------------------------------------------------- E-step


def estep_section(device: torch.device, plan: Plan) -> list[str]:
    from cleanprior import corrupt
    from cleanprior.learning.em import EMConfig
    from cleanprior.operators import Mask, random_mask

    config = EMConfig()
    options = config.posterior_options()
    if plan.estep_steps:
        options["steps"] = plan.estep_steps
    batch = plan.estep_batch
    clean = mnist5k("test")[:batch].to(device)
    generator = torch.Generator(device).manual_seed(0)
    mask = random_mask(IMAGE_SHAPE, MISSING, batch=batch, generator=generator, device=device)
    y, A = corrupt(clean, Mask(mask), NOISE_STD, generator=generator)
    rows = []
    for key in plan.estep_networks:
        print(f"E-step {key} ...", file=sys.stderr)
        label, _ = NETWORKS[key]
        denoiser = network(key, device).eval().requires_grad_(False)

        def posterior(steps: int, denoiser: PreconditionedDenoiser = denoiser) -> float:
            synchronize(device)
            began = time.perf_counter()
            x = sample_posterior(denoiser, A, y, shape=IMAGE_SHAPE, noise_std=NOISE_STD, method=config.posterior,
                                 generator=torch.Generator(device).manual_seed(1), **dict(options, steps=steps))
            synchronize(device)
            assert x.shape == clean.shape and torch.isfinite(x).all()
            return time.perf_counter() - began

        posterior(2)  # warm-up
        meter = LoadMeter()
        meter.start()
        times = [posterior(options["steps"]) for _ in range(plan.estep_repeats)]
        sigma = torch.ones(batch, device=device)
        synchronize(device)
        began = time.perf_counter()
        with torch.inference_mode():
            for _ in range(options["steps"]):
                denoiser(clean, sigma)
        synchronize(device)
        forward = time.perf_counter() - began
        meter.stop()
        call = statistics.median(times)
        rows.append([
            label, f"{config.posterior}, {options['solver']} x{options['iterations']}, {options['sampler']}",
            str(options["steps"]), str(batch), str(len(times)), sig3(call), f"**{sig3(batch / call)}**",
            sig3(call / batch * 1e3), f"{call / forward:.2f}x", fmt_load(meter.cores),
        ])
        print(f"  {key}: {sig3(batch / call)} samples/s", file=sys.stderr)
    headers = ["network (untrained)", "method", "steps", "batch", "calls", "s/call (median)", "samples/s",
               "ms/sample", "vs bare forward calls", "other load (cores)"]
    return [
        (f"### E-step posterior samples per second (masked MNIST, {MISSING:.0%} missing, noise std {NOISE_STD}; "
         "`EMConfig().posterior_options()`)"), "",
        markdown_table(headers, rows), "",
        ("\"vs bare forward calls\": the call's time over `steps` bare forward calls of the denoiser on the same "
         "batch under `inference_mode` (what the guidance's vector-Jacobian products and solver cost on top)."), "",
    ]


# --------------------------------------------------------------------------- DiEM round


def diem_section(device: torch.device, plan: Plan) -> list[str]:
    from cleanprior.data.files import corrupt_dataset
    from cleanprior.learning.em import EMConfig, EvalConfig
    from cleanprior.learning.fit import fit

    lines = []
    evaluation = EvalConfig(**plan.diem_eval)
    if evaluation.reference:
        from cleanprior.metrics.frechet import feature_network

        began = time.perf_counter()
        feature_network(evaluation.reference)
        lines.append(f"The Frechet classifier took {sig3(time.perf_counter() - began)} s to train or load, "
                     "before the run and outside its timings.")
    x = mnist5k("train")[: plan.diem_observations]
    observations = corrupt_dataset(x, "mask", noise_std=NOISE_STD, missing=MISSING,
                                   generator=torch.Generator().manual_seed(0))
    # the demo's options (commands.demo), with fewer training steps
    config = EMConfig(rounds=2, posterior="mmps", steps=16, sampler="ddpm", samples=1, batch_size=128,
                      solver="gmres", iterations=1, gaussian_rank=32, gaussian_iterations=8, gaussian_samples=1,
                      heldout=plan.diem_heldout)
    steps = plan.diem_train_steps
    training = TrainConfig(steps=steps, batch_size=64, lr=2e-3, warmup=min(20, steps // 2), ema_decay=0.98,
                           checkpoint_every=100, progress=False)
    print("DiEM round ...", file=sys.stderr)
    meter = LoadMeter()
    meter.start()
    with tempfile.TemporaryDirectory(prefix="bench-speed-diem-") as run:
        result = fit(observations, Path(run) / "run", method="diem", network=NETWORKS["demo"][1], config=config,
                     training=training, evaluation=evaluation, device=str(device), progress=False,
                     description="bench_speed")
    meter.stop()
    trained = plan.diem_observations - plan.diem_heldout
    rows = []
    for row in result.metrics:
        k = row["round"]
        get = row.get
        estep = get("estep_seconds")
        what = "Gaussian start" if k == 0 else ("exact (Gaussian start)" if k == 1 else "MMPS, GMRES x1, 16 ddpm steps")
        rows.append([
            str(k), what,
            sig3(get("start_seconds")) if get("start_seconds") is not None else "",
            sig3(estep) if estep is not None else "",
            sig3(trained / estep) if estep else "",
            sig3(get("mstep_seconds")) if get("mstep_seconds") is not None else "",
            sig3(steps / get("mstep_seconds")) if get("mstep_seconds") else "",
            sig3(get("eval_seconds")) if get("eval_seconds") is not None else "not recorded",
            sig3(get("round_seconds")) if get("round_seconds") is not None else "",
        ])
    headers = ["round", "E-step posterior", "start s", "E-step s", "E-step samples/s", "M-step s",
               "M-step steps/s", "evaluation s", "round s (E + M)"]
    return [
        (f"### One DiEM round, split (`fit(method=\"diem\")`, demo U-Net and options, {plan.diem_observations} "
         f"MNIST images, {plan.diem_heldout} held out, {MISSING:.0%} missing, {steps} training steps of batch 64, "
         "seconds from `metrics.json`)"), "",
        markdown_table(headers, rows), "",
        (f"Other load during the run: {fmt_load(meter.cores)} cores. Evaluation: "
         f"`EvalConfig({', '.join(f'{k}={v!r}' for k, v in plan.diem_eval.items())})`. "
         "\"M-step steps/s\" divides the steps by the whole `train` call (set-up and checkpoints included)."),
        *lines, "",
    ]


# --------------------------------------------------------------------------- main


def run(device: torch.device, plan: Plan, compile: bool, compile_note: str, parts: Sequence[str]) -> str:
    """Run the measurements of ``parts`` and return the Markdown section."""
    began = time.perf_counter()
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    cpu = machine_lines(device)[0].removeprefix("- Machine: ").split(",")[0]
    accelerator = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu
    lines = [f"## {date}, {accelerator} (`{device}`)", "", *machine_lines(device)]
    lines.append("- Networks: " + "; ".join(
        f"{label}: {parameters(network(key, torch.device('cpu'))):,} parameters" for key, (label, _) in NETWORKS.items()))
    lines.append("")
    if "train" in parts:
        lines += training_section(device, plan, compile, compile_note)
    if "sampler" in parts:
        lines += sampler_section(device, plan)
    if "estep" in parts:
        lines += estep_section(device, plan)
    if "diem" in parts:
        lines += diem_section(device, plan)
    load = " / ".join(f"{v:.2f}" for v in os.getloadavg())
    lines += [f"Total time {time.perf_counter() - began:.0f} s; load average (1 / 5 / 15 min) at the end: {load}.", ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (cuda when available; default)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to check that the script works")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch intra-op threads (0: torch's default; 1 is much faster on a loaded small CPU)")
    parser.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                        help="also the torch.compile'd loops (auto: on CUDA only; on a CPU the compilation takes minutes)")
    parser.add_argument("--networks", default=",".join(NETWORKS),
                        help="comma-separated networks of the training rows (default: demo,default)")
    parser.add_argument("--skip", default="", help=f"comma-separated parts to leave out, of {','.join(PARTS)}")
    parser.add_argument("--output", type=Path, default=RESULTS,
                        help="Markdown file the section is appended to (default benchmarks/RESULTS_SPEED.md)")
    args = parser.parse_args(argv)
    name = args.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if args.threads:
        torch.set_num_threads(args.threads)
    skipped = {p for p in args.skip.split(",") if p}
    if skipped - set(PARTS):
        parser.error(f"unknown parts {sorted(skipped - set(PARTS))}; known: {', '.join(PARTS)}")
    plan = QUICK if args.quick else PLANS[(device.type if device.type == "cuda" else "cpu", False)]
    networks = [n for n in args.networks.split(",") if n]
    if set(networks) - set(NETWORKS):
        parser.error(f"unknown networks {sorted(set(networks) - set(NETWORKS))}; known: {', '.join(NETWORKS)}")
    plan = dataclasses.replace(plan, train=tuple(t for t in plan.train if t[0] in networks))
    compile = args.compile == "on" or (args.compile == "auto" and device.type == "cuda")
    note = "" if compile else ("n/a: not run (on a CPU the compilation takes minutes, 311 s for the demo U-Net on 2 "
                               "loaded cores; pass `--compile on`)")
    section = run(device, plan, compile, note, [p for p in PARTS if p not in skipped])
    print(section)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    fresh = not args.output.exists() or args.output.stat().st_size == 0
    with args.output.open("a") as out:
        if fresh:
            out.write(f"# cleanprior speed benchmarks\n\n{PREAMBLE}\n")
        out.write(section + "\n")


if __name__ == "__main__":
    main()
