"""Every way of learning a prior from observations, on the same tasks (issue 7's table).

Tasks, MNIST 5k at this machine's scale (``--images`` training images, of which ``--heldout``
are held out for the posterior metrics):

- ``inpaint``: 75 % of the pixels missing, noise std 0.01;
- ``denoise``: the identity with noise std 0.2 (data in [-1, 1]);
- ``deblur``: a Gaussian kernel of std 1.5 px, noise std 0.01.

Methods (``cleanprior fit --method``): ``diem``, ``emdiffusion`` (its start trained on
``--init-clean`` clean training images that are not among the observations), ``flowdiff``,
``ambient`` (inpaint and denoise), ``sure`` (denoise), ``naive`` and ``clean``. Every method gets
the same network, the same number of rounds and the same training steps per round.

Columns: the Frechet distance of the learned prior's samples to the clean test split
(classifier features), the PSNR/SSIM of the MMPS posterior mean on held-out observations, for
FlowDiff also the one-pass amortized PSNR/SSIM, and the wall time of the learning (start and
rounds, evaluation excluded). Each figure is the mean over the seeds, ``± half range``.

Usage::

    .venv/bin/python benchmarks/bench_learning.py [--tasks inpaint,denoise,deblur] [--methods ...]
        [--seeds 0,1] [--images 256] [--rounds 2] [--train-steps 150] [--threads 1]

Every run keeps its folder under ``--workdir`` (default ``/tmp/cleanprior-bench-learning``): an
interrupted benchmark resumes where it stopped, and finished runs are only read.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import time
from collections.abc import Sequence

import torch
from bench_core import machine_lines
from bench_em import mean_spread

RESULTS = pathlib.Path(__file__).resolve().parent / "RESULTS_LEARNING.md"
TASKS = {
    "inpaint": ("mask", 0.01, {"missing": 0.75}),
    "denoise": ("identity", 0.2, {}),
    "deblur": ("blur", 0.01, {"kernel_std": 1.5}),
}
METHODS = ("diem", "emdiffusion", "flowdiff", "ambient", "sure", "naive", "clean")
APPLIES = {"ambient": ("inpaint", "denoise"), "sure": ("denoise",)}


def run_one(task: str, method: str, seed: int, args: argparse.Namespace) -> dict:
    """One method on one task with one seed: its final metrics and learning time."""
    from cleanprior import TrainConfig
    from cleanprior.data import mnist5k
    from cleanprior.data.files import corrupt_dataset
    from cleanprior.learning.em import EMConfig, EvalConfig
    from cleanprior.learning.fit import fit
    from cleanprior.runs.prior import NetworkConfig

    operator, noise_std, options = TASKS[task]
    train_split = mnist5k("train")
    x = train_split[: args.images]
    observations = corrupt_dataset(x, operator, noise_std=noise_std, generator=torch.Generator().manual_seed(seed),
                                   **options)
    run = args.workdir / f"{task}-{method}-seed{seed}"
    flow = None
    if method == "flowdiff":
        from cleanprior.learning.flowdiff import FlowDiffConfig

        # a small flow and one noise level in the bound: about 1 s per step on one core
        flow = FlowDiffConfig(batch_size=32, hidden=32, layers=4, blocks=1, bound_levels=1, ema_decay=0.98)
    result = fit(
        observations, run, method=method,
        init_clean=train_split[args.images : args.images + args.init_clean],
        flow=flow,
        network=NetworkConfig(channels=(16, 32, 64), blocks=1),
        config=EMConfig(rounds=args.rounds, steps=16, sampler="ddpm", batch_size=128, solver="gmres", iterations=1,
                        gaussian_rank=32, gaussian_iterations=8, gaussian_samples=1, heldout=args.heldout, seed=seed,
                        zetas=(0.1, 0.3, 1.0), tune_observations=16),
        training=TrainConfig(steps=args.train_steps, batch_size=64, lr=2e-3, warmup=20, ema_decay=0.98,
                             checkpoint_every=50, progress=False),
        evaluation=EvalConfig(prior_samples=args.eval_samples, posterior_samples=2, steps=16, reference="mnist5k",
                              every=args.rounds),
        resume=(run / "config.json").exists(), progress=False,
        description=f"MNIST 5k {task}, {method}, seed {seed}",
    )
    last = result.metrics[-1]
    seconds = sum(r.get("start_seconds", 0.0) + r.get("round_seconds", 0.0) for r in result.metrics)
    return {"task": task, "method": method, "seed": seed, "seconds": seconds,
            **{k: last.get(k, float("nan")) for k in ("frechet", "psnr_mean", "ssim_mean", "amortized_psnr",
                                                       "amortized_ssim", "ppc")}}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--tasks", default=",".join(TASKS), help="comma-separated tasks")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods")
    parser.add_argument("--seeds", default="0,1", help="comma-separated seeds")
    parser.add_argument("--images", type=int, default=256, help="training images (observations)")
    parser.add_argument("--heldout", type=int, default=32, help="held-out observations for the posterior metrics")
    parser.add_argument("--init-clean", dest="init_clean", type=int, default=50, help="EMDiffusion's clean images")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of every method")
    parser.add_argument("--train-steps", type=int, default=150, help="training steps per round")
    parser.add_argument("--eval-samples", type=int, default=256, help="prior samples for the Frechet distance")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--workdir", type=pathlib.Path, default=pathlib.Path("/tmp/cleanprior-bench-learning"))
    parser.add_argument("--output", type=pathlib.Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    tasks = [t for t in args.tasks.split(",") if t]
    methods = [m for m in args.methods.split(",") if m]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    args.workdir.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    rows = []
    for task in tasks:
        for method in methods:
            if task not in APPLIES.get(method, tuple(TASKS)):
                continue
            for seed in seeds:
                print(f"{task} / {method} / seed {seed}", flush=True)
                rows.append(run_one(task, method, seed, args))
                (args.workdir / "rows.json").write_text(json.dumps(rows, indent=1))
    lines = ["| task | method | Frechet | PSNR (MMPS mean, dB) | SSIM | PSNR amortized | SSIM amortized | PPC | "
             "learning time (s) |", "|---|---|---|---|---|---|---|---|---|"]
    for task in tasks:
        for method in methods:
            mine = [r for r in rows if r["task"] == task and r["method"] == method]
            if not mine:
                lines.append(f"| {task} | {method} | n/a (does not apply) | | | | | | |")
                continue
            cells = [mean_spread([r[k] for r in mine]) for k in ("frechet", "psnr_mean", "ssim_mean",
                                                                 "amortized_psnr", "amortized_ssim", "ppc", "seconds")]
            lines.append(f"| {task} | {method} | " + " | ".join(cells) + " |")
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    section = [f"## Learning methods compared, {date}", "", *machine_lines(torch.device("cpu")),
               f"- Scale: {args.images} MNIST images per task ({args.heldout} held out), {args.rounds} rounds of "
               f"{args.train_steps} training steps, seeds {seeds}",
               f"- Total time: {time.perf_counter() - began:.0f} s", "", *lines, ""]
    text = "\n".join(section)
    print(text)
    if not args.output.exists():
        args.output.write_text("# Learning a prior from observations: every method (`bench_learning.py`)\n")
    with args.output.open("a") as out:
        out.write("\n" + text)


if __name__ == "__main__":
    main()
