r"""Benchmark of the diffusion core: training throughput, sampling cost and network sizes.

What is measured, and how:

1. **Parameters** of the two default denoisers: ``PreconditionedDenoiser(MLP(5))`` (DiEM's
   low-dimensional manifold network, hidden widths (256, 256, 256)) and
   ``PreconditionedDenoiser(UNet(in_channels=1))`` (channels (32, 64, 128), 2 blocks per level,
   attention at the coarsest level).
2. **Training throughput** through the real training code path, :func:`cleanprior.train` with
   ``TrainConfig(steps=..., batch_size=..., amp=..., progress=False)``. Its ``callback`` runs
   only at the loop's loss reads (every ``log_every`` steps, in batches), so single steps cannot
   be stamped; instead each repeat times one whole call of ``warm-up + timed`` steps and one of
   ``warm-up`` steps on the same network, and a step costs their difference over the timed
   steps (``time_train_steps``, which ``bench_speed.py`` uses too). The set-up of a call
   cancels out; everything a step costs stays in: minibatch and noise draws, forward and
   backward, gradient clipping, AdamW, the EMA update and the periodic loss reads. The table
   gives the median over the repeats and their range. The MLP trains on 5-D Gaussian stand-in
   vectors (the speed does not depend on the values) with batch 1024; the U-Net on
   ``mnist5k()`` (4,500 images of 1x28x28) with batch 64 and 128, in float32 and with
   ``amp=True`` (bfloat16 autocast).
3. **Sampling cost** of :func:`cleanprior.sample_prior` under ``torch.inference_mode()`` with
   ``ddim`` (64 steps), ``heun`` (32 steps) and ``pc`` (64 steps, 1 correction), one chunk of
   ``batch`` samples per call (``n = batch_size = batch``), for the untrained networks (the cost
   of a network does not depend on its weights) and, as a reference point, the exact
   :class:`cleanprior.GaussianMixture` denoiser in 2-D and 64-D (16 full-covariance
   components). The denoiser is wrapped in a counter, so the table gives both the evaluations
   per sample that ``get_sampler(name).evaluations(steps)`` promises and the number actually
   made. One denoiser evaluation warms up each denoiser and batch size; then each call is
   repeated up to ``max_runs`` times while the runs so far take less than ``run_budget_s``, and
   the table gives the median call, that time per sample, and per denoiser call ("ms/evaluation",
   one evaluation of the whole batch).

Another process may share the machine, so every timed row also reports the CPU cores that
*other* processes kept busy during it ("other load": the busy time of the whole machine from
``/proc/stat``, hypervisor steal included, minus this process's CPU time, over the wall time).

Usage::

    .venv/bin/python benchmarks/bench_core.py [--device cpu|cuda] [--quick] [--output PATH]

The results are printed and appended to ``--output`` as a new section headed with the date,
so earlier results stay.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import math
import os
import shlex
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import cleanprior
from cleanprior import (
    TrainConfig,
    train,
    GaussianMixture,
    PreconditionedDenoiser,
    get_sampler,
    sample_prior,
)
from cleanprior.data import mnist5k
from cleanprior.diffusion import Denoiser
from cleanprior.nn import MLP, UNet

IMAGE_SHAPE = (1, 28, 28)
VECTOR_SHAPE = (5,)
SAMPLERS: tuple[tuple[str, int, dict[str, Any]], ...] = (
    ("ddim", 64, {}),
    ("heun", 32, {}),
    ("pc", 64, {"corrections": 1}),
)


@dataclasses.dataclass(frozen=True)
class Plan:
    """How much to repeat each measurement.

    Attributes:
        mlp_warmup: Untimed training steps of the MLP before the timed ones.
        mlp_steps: Timed training steps of the MLP.
        unet_warmup: Untimed training steps of the U-Net.
        unet_steps: Timed float32 training steps of the U-Net.
        amp_steps: Timed bfloat16-autocast training steps of the U-Net.
        mlp_repeats: Repeats of the MLP's timing (each one call of warm-up + timed steps and
            one of warm-up steps).
        unet_repeats: Repeats of each U-Net timing.
        max_runs: The most sampling calls per row.
        run_budget_s: No further sampling call starts once the calls of a row took this long.
    """

    mlp_warmup: int
    mlp_steps: int
    unet_warmup: int
    unet_steps: int
    amp_steps: int
    mlp_repeats: int
    unet_repeats: int
    max_runs: int
    run_budget_s: float


FULL = Plan(
    mlp_warmup=20, mlp_steps=200, unet_warmup=1, unet_steps=4, amp_steps=2, mlp_repeats=3, unet_repeats=1,
    max_runs=5, run_budget_s=15.0,
)
QUICK = Plan(
    mlp_warmup=5, mlp_steps=20, unet_warmup=1, unet_steps=1, amp_steps=1, mlp_repeats=1, unet_repeats=1,
    max_runs=1, run_budget_s=0.0,
)
PREAMBLE = (
    "Appended to by `benchmarks/bench_core.py`, one dated section per run; see the script's "
    "docstring for what each column means. \"Other load\" is the CPU cores that other processes "
    "kept busy during a row: on a small shared machine it changes the timings a lot."
)


class LoadMeter:
    """The CPU cores other processes keep busy between :meth:`start` and :meth:`stop`."""

    def __init__(self) -> None:
        self._start: tuple[float, float | None, float] | None = None
        self.cores: float | None = None

    @staticmethod
    def _snapshot() -> tuple[float, float | None, float]:
        """Wall time, busy CPU seconds of the machine (None without /proc/stat), own CPU seconds."""
        own = os.times()
        busy = None
        try:
            with open("/proc/stat") as stat:
                fields = [int(v) for v in stat.readline().split()[1:9]]
            user, nice, system, _idle, _iowait, irq, softirq, steal = fields
            busy = (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError):
            pass
        return time.perf_counter(), busy, own.user + own.system

    def start(self) -> None:
        self._start = self._snapshot()

    def stop(self) -> None:
        assert self._start is not None, "stop() before start()"
        wall0, busy0, own0 = self._start
        wall1, busy1, own1 = self._snapshot()
        if busy0 is None or busy1 is None or wall1 <= wall0:
            self.cores = None
        else:
            self.cores = max(0.0, (busy1 - busy0 - (own1 - own0)) / (wall1 - wall0))


class CountingDenoiser:
    """A denoiser that counts its calls and the samples it was evaluated on."""

    def __init__(self, denoiser: Denoiser) -> None:
        self.denoiser = denoiser
        self.calls = 0
        self.rows = 0

    def reset(self) -> None:
        self.calls = 0
        self.rows = 0

    def __call__(self, x_t: Tensor, sigma: Tensor) -> Tensor:
        self.calls += 1
        self.rows += x_t.shape[0]
        return self.denoiser(x_t, sigma)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fmt_load(cores: float | None) -> str:
    return "n/a" if cores is None else f"{cores:.2f}"


def sig3(value: float) -> str:
    """A positive number with three significant digits, without an exponent: 0.0123, 45.6, 7,890."""
    if value <= 0:
        return f"{value:g}"
    digits = max(0, 2 - math.floor(math.log10(value)))
    return f"{value:,.{digits}f}"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def mlp_denoiser(device: torch.device) -> PreconditionedDenoiser:
    return PreconditionedDenoiser(MLP(VECTOR_SHAPE[0])).to(device)


def unet_denoiser(device: torch.device) -> PreconditionedDenoiser:
    return PreconditionedDenoiser(UNet(in_channels=IMAGE_SHAPE[0])).to(device)


def random_mixture(
    features: int, components: int, generator: torch.Generator
) -> GaussianMixture:
    """A mixture with standard normal means and random full covariances of scale about 0.1."""
    means = torch.randn(components, features, generator=generator)
    factors = torch.randn(components, features, features, generator=generator) / features**0.5
    covariances = 0.1 * factors @ factors.mT + 1e-3 * torch.eye(features)
    weights = torch.rand(components, generator=generator) + 0.1
    return GaussianMixture(weights, means, covariances)


def parameter_rows() -> list[list[str]]:
    rows = []
    for label, net in (
        ("PreconditionedDenoiser(MLP(5))", mlp_denoiser(torch.device("cpu"))),
        ("PreconditionedDenoiser(UNet(in_channels=1))", unet_denoiser(torch.device("cpu"))),
    ):
        total = sum(p.numel() for p in net.parameters())
        config = ", ".join(f"{k}={v}" for k, v in net.network.config.items())
        rows.append([label, f"{total:,}", f"`{config}`"])
    return rows


def time_ours(denoiser: PreconditionedDenoiser, data: Tensor, batch: int, warmup: int, steps: int, *,
              compile: bool = False, seed: int = 0, **config: Any) -> float:
    """Seconds per step of :func:`cleanprior.train`: (time of ``warmup + steps`` steps - time of ``warmup``) / ``steps``.

    The callback of ``train`` runs only at its loss reads (every ``log_every`` steps), so a step
    cannot be stamped; the difference of two whole calls cancels what a call costs once (the
    probe, the EMA copy, the last read and snapshot) and keeps everything a step costs.
    """
    device = data.device

    def call(n: int) -> float:
        options = TrainConfig(steps=n, batch_size=batch, progress=False, compile=compile, **config)
        synchronize(device)
        began = time.perf_counter()
        train(denoiser, data, options, generator=torch.Generator(device).manual_seed(seed))
        synchronize(device)
        return time.perf_counter() - began

    short = call(warmup)
    long = call(warmup + steps)
    return (long - short) / steps


def time_train_steps(denoiser: PreconditionedDenoiser, data: Tensor, batch: int, warmup: int, steps: int,
                     repeats: int = 1, **config: Any) -> tuple[list[float], float | None]:
    """Seconds per step of :func:`cleanprior.train` for each of ``repeats`` repeats, and the other load.

    The helper other benchmarks (``bench_core.py``) time ``train`` with.
    """
    meter = LoadMeter()
    meter.start()
    seconds = [time_ours(denoiser, data, batch, warmup, steps, **config) for _ in range(repeats)]
    meter.stop()
    return seconds, meter.cores


def bench_training(
    label: str,
    denoiser: PreconditionedDenoiser,
    data: Tensor,
    batch: int,
    amp: bool,
    warmup: int,
    steps: int,
    repeats: int,
) -> list[str]:
    """Time ``steps`` steps of ``train`` after ``warmup`` ones, as the difference of two whole calls, ``repeats`` times."""
    seconds, load = time_train_steps(denoiser, data, batch, warmup, steps, repeats, amp=amp)
    median = statistics.median(seconds)
    spread = f"{sig3(min(seconds) * 1e3)}–{sig3(max(seconds) * 1e3)}" if repeats > 1 else "–"
    return [
        label,
        str(batch),
        "bf16 autocast" if amp else "fp32",
        f"{repeats} x {steps}",
        sig3(median * 1e3),
        spread,
        sig3(batch / median),
        fmt_load(load),
    ]


def bench_sampling(
    label: str,
    denoiser: Denoiser,
    shape: tuple[int, ...],
    batch: int,
    device: torch.device,
    plan: Plan,
) -> list[list[str]]:
    """Time ``sample_prior`` with every sampler of :data:`SAMPLERS` on one batch."""
    counter = CountingDenoiser(denoiser)
    rows = []
    with torch.inference_mode():
        denoiser(torch.zeros(batch, *shape, device=device), torch.ones(batch, device=device))
    for name, steps, options in SAMPLERS:
        promised = get_sampler(name, **options).evaluations(steps)
        generator = torch.Generator(device).manual_seed(0)
        times: list[float] = []
        meter = LoadMeter()
        meter.start()
        while len(times) < plan.max_runs and (not times or sum(times) < plan.run_budget_s):
            counter.reset()
            start = time.perf_counter()
            with torch.inference_mode():
                sample_prior(
                    counter,
                    batch,
                    shape=shape,
                    steps=steps,
                    sampler=name,
                    batch_size=batch,
                    generator=generator,
                    **options,
                )
            synchronize(device)
            times.append(time.perf_counter() - start)
        meter.stop()
        counted = counter.rows / batch
        call = statistics.median(times)
        rows.append(
            [
                label,
                name,
                str(steps),
                str(promised),
                f"{counted:g}" if counted == promised else f"**{counted:g}** (mismatch)",
                str(batch),
                str(len(times)),
                sig3(call),
                sig3(call / batch * 1e3),
                sig3(call / counter.calls * 1e3),
                fmt_load(meter.cores),
            ]
        )
        print(f"  sampled {label} {name} batch {batch}: {sig3(call)} s per call", file=sys.stderr)
    return rows


def machine_lines(device: torch.device) -> list[str]:
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as info:
            names = (line.split(":", 1)[1] for line in info if line.startswith("model name"))
            cpu = next(names).strip()
    except (OSError, StopIteration):
        pass
    accelerator = torch.cuda.get_device_name(device) if device.type == "cuda" else "none"
    load = " / ".join(f"{v:.2f}" for v in os.getloadavg())
    return [
        (
            f"- Machine: {cpu}, {os.cpu_count()} logical cores; torch {torch.__version__} with "
            f"{torch.get_num_threads()} intra-op threads; cleanprior {cleanprior.__version__}"
        ),
        f"- Device: `{device}` (accelerator: {accelerator})",
        f"- Command: `{shlex.join(sys.orig_argv)}`",
        f"- Load average (1 / 5 / 15 min) at the start: {load}",
    ]


def training_table(device: torch.device, plan: Plan) -> str:
    """Train the MLP on vectors and the U-Net on MNIST, in float32 and bfloat16 autocast."""
    vectors = torch.randn(8192, *VECTOR_SHAPE, generator=torch.Generator().manual_seed(0))
    images = mnist5k("train")
    mlp = mlp_denoiser(device)
    runs: list[tuple[str, PreconditionedDenoiser, Tensor, int, bool, int, int, int]] = [
        ("MLP(5), 5-D vectors", mlp, vectors, 1024, False, plan.mlp_warmup, plan.mlp_steps, plan.mlp_repeats)
    ]
    for amp in (False, True):
        steps = plan.amp_steps if amp else plan.unet_steps
        for batch in (64, 128):
            net = unet_denoiser(device)
            runs.append(("UNet, MNIST 1x28x28", net, images, batch, amp, plan.unet_warmup, steps, plan.unet_repeats))
    rows = []
    for label, net, data, batch, amp, warmup, steps, repeats in runs:
        rows.append(bench_training(label, net, data.to(device), batch, amp, warmup, steps, repeats))
        print(f"  trained {label} batch {batch} amp={amp}: {rows[-1][4]} ms/step", file=sys.stderr)
    headers = [
        "network, data",
        "batch",
        "precision",
        "repeats x timed steps",
        "ms/step (median)",
        "ms/step (range over repeats)",
        "samples/s",
        "other load (cores)",
    ]
    return markdown_table(headers, rows)


def sampling_table(device: torch.device, plan: Plan) -> str:
    """Sample from the untrained networks and from two exact mixtures."""
    mixtures = torch.Generator().manual_seed(0)
    mixture_2d = random_mixture(2, 16, mixtures).to(device)
    mixture_64d = random_mixture(64, 16, mixtures).to(device)
    cases: list[tuple[str, Denoiser, tuple[int, ...], tuple[int, ...]]] = [
        ("MLP(5), untrained", mlp_denoiser(device).eval(), VECTOR_SHAPE, (1, 1024)),
        ("UNet 1x28x28, untrained", unet_denoiser(device).eval(), IMAGE_SHAPE, (1, 64)),
        ("GaussianMixture d=2, K=16", mixture_2d, (2,), (1, 1024)),
        ("GaussianMixture d=64, K=16", mixture_64d, (64,), (1, 1024)),
    ]
    rows = []
    for label, denoiser, shape, batches in cases:
        for batch in batches:
            rows += bench_sampling(label, denoiser, shape, batch, device, plan)
    headers = [
        "denoiser",
        "sampler",
        "steps",
        "evals/sample (`evaluations`)",
        "evals/sample (counted)",
        "batch",
        "runs",
        "s/call (median)",
        "ms/sample",
        "ms/evaluation",
        "other load (cores)",
    ]
    return markdown_table(headers, rows)


def run(device: torch.device, plan: Plan) -> str:
    """Run every measurement and return the Markdown section."""
    began = time.perf_counter()
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"## {date}", "", *machine_lines(device), ""]
    parameters = markdown_table(["denoiser", "parameters", "network config"], parameter_rows())
    lines += ["### Parameters", "", parameters, ""]
    print("training ...", file=sys.stderr)
    lines += [
        "### Training (`cleanprior.train`: (time of warm-up + timed steps - time of warm-up steps) / timed steps)",
        "",
        training_table(device, plan),
        "",
    ]
    print("sampling ...", file=sys.stderr)
    lines += [
        "### Sampling (`cleanprior.sample_prior`, one call of `n = batch_size = batch` samples)",
        "",
        sampling_table(device, plan),
        "",
    ]
    load = " / ".join(f"{v:.2f}" for v in os.getloadavg())
    total = time.perf_counter() - began
    lines += [f"Total time {total:.0f} s; load average (1 / 5 / 15 min) at the end: {load}.", ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--device", default="cpu", help="torch device: cpu (default) or cuda")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions, for a smoke run")
    parser.add_argument(
        "--output",
        type=Path,
        default=Path(__file__).resolve().parent / "RESULTS.md",
        help="Markdown file the results are appended to (default benchmarks/RESULTS.md)",
    )
    args = parser.parse_args(argv)
    section = run(torch.device(args.device), QUICK if args.quick else FULL)
    print(section)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    fresh = not args.output.exists() or args.output.stat().st_size == 0
    with args.output.open("a") as out:
        if fresh:
            out.write(f"# cleanprior core benchmarks\n\n{PREAMBLE}\n\n")
        out.write(section + "\n")


if __name__ == "__main__":
    main()
