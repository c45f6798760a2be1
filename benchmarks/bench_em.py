"""DiEM experiments: priors learned from observations only, against clean-data bounds.

Two experiments, each appending a dated section to ``benchmarks/RESULTS_EM.md``:

- ``manifold`` (DiEM section 5.1 at this machine's scale): a random 1-D manifold in 5-D
  (``manifold_prior(features=5)``), each observation a random 2x5 projection with noise std
  0.05. EM from the Gaussian start, MMPS E-step; per round the Sinkhorn divergence of prior
  samples to exact samples of the truth, next to the Gaussian start, a prior trained on the clean
  latents (upper bound) and the exact-vs-exact floor.
- ``mnist`` (DiEM section 5.2 at this machine's scale): MNIST 5k with 25, 50 and 75 % of the
  pixels missing (noise std 0.01): the Frechet distance (classifier features, see
  :mod:`cleanprior.metrics.frechet`) of the EM prior's samples to the clean test split, of a prior
  trained on the clean images (upper bound) and of one trained on the masked images as if clean
  (lower bound); posterior PSNR/SSIM (MMPS) on held-out observations.
- ``mnist-full`` (issue 14, on a GPU): every MNIST 5k training image at 75 % missing, the default
  U-Net, 16 rounds of 1,500 steps, against a clean prior of the same network at the same steps,
  round by round.

Usage::

    .venv/bin/python benchmarks/bench_em.py manifold [--rounds 8] [--seeds 0,1]
    .venv/bin/python benchmarks/bench_em.py mnist [--missing 0.75] [--rounds 4] [--images 2048]
    python benchmarks/bench_em.py mnist-full --device cuda [--rounds 16] [--train-steps 1500] [--seeds 0]

Every run keeps its run folder under ``--workdir`` (default ``/tmp/cleanprior-bench-em``), so an
interrupted benchmark resumes where it stopped.
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

RESULTS = pathlib.Path(__file__).resolve().parent / "RESULTS_EM.md"
NOISE_STD_MANIFOLD = 0.05
NOISE_STD_MNIST = 0.01


def mean_spread(values: Sequence[float]) -> str:
    """``mean +- half range`` over seeds."""
    values = [v for v in values if v == v]
    if not values:
        return "n/a"
    mean = sum(values) / len(values)
    spread = (max(values) - min(values)) / 2
    return f"{mean:.4g} ± {spread:.2g}" if len(values) > 1 else f"{mean:.4g}"


def manifold(args: argparse.Namespace) -> list[str]:
    from cleanprior import TrainConfig, train
    from cleanprior.data.files import Observations
    from cleanprior.data.synthetic import manifold_prior
    from cleanprior.diffusion.samplers import sample_prior
    from cleanprior.learning.em import EMConfig, EvalConfig, fit_em
    from cleanprior.metrics import sinkhorn_divergence
    from cleanprior.operators import Matrix, random_projection
    from cleanprior.runs.prior import NetworkConfig, default_network

    truth = manifold_prior(features=5)
    network = NetworkConfig(hidden=(256, 256, 256))
    training = TrainConfig(steps=args.train_steps, batch_size=1024, lr=1e-3, ema_decay=0.99, checkpoint_every=500,
                           progress=False)
    per_seed: list[dict[str, list[float]]] = []
    seconds = []
    for seed in args.seeds:
        g = torch.Generator().manual_seed(seed)
        x = truth.sample(args.observations, g)
        A = random_projection(2, 5, batch=args.observations, generator=g)
        y = Matrix(A)(x) + NOISE_STD_MANIFOLD * torch.randn(args.observations, 2, generator=g)
        reference = truth.sample(args.eval_samples, g)
        floor = float(sinkhorn_divergence(truth.sample(args.eval_samples, g), reference))
        observations = Observations(y=y, operator=Matrix(A), noise_std=NOISE_STD_MANIFOLD, shape=(5,))
        reference_path = args.workdir / f"manifold-reference-{seed}.npz"
        _save_reference(reference_path, reference)
        began = time.perf_counter()
        result = fit_em(
            observations, args.workdir / f"manifold-seed{seed}", network=network,
            config=EMConfig(rounds=args.rounds, steps=64, sampler="ddpm", batch_size=4096, solver="gmres",
                            iterations=1, gaussian_iterations=64, heldout=256, seed=seed),
            training=training, evaluation=EvalConfig(prior_samples=args.eval_samples, steps=64,
                                                     reference=str(reference_path)),
            resume=(args.workdir / f"manifold-seed{seed}" / "config.json").exists(), progress=True,
            description="1-D manifold in 5-D, random 2x5 projections",
        )
        seconds.append(time.perf_counter() - began)
        clean = default_network((5,), network)
        clean = train(clean, truth.sample(args.observations, g), training, generator=g).denoiser
        clean_samples = sample_prior(clean, args.eval_samples, shape=(5,), steps=64, sampler="heun", generator=g)
        row = {f"round {m['round']}": [m["sinkhorn"]] for m in result.metrics}
        row["clean latents"] = [float(sinkhorn_divergence(clean_samples, reference))]
        row["floor"] = [floor]
        per_seed.append(row)
    keys = list(per_seed[0])
    lines = ["| prior | Sinkhorn to the truth (mean ± half range over seeds) |", "|---|---|"]
    for key in keys:
        label = "Gaussian start" if key == "round 0" else key
        lines.append(f"| {label} | {mean_spread([row[key][0] for row in per_seed])} |")
    lines += ["", f"EM wall time per seed: {mean_spread(seconds)} s ({args.rounds} rounds, "
              f"{args.observations} observations, {args.train_steps} M-step steps per round)."]
    return lines


def _save_reference(path: pathlib.Path, x: torch.Tensor) -> None:
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, x=x.numpy())


def mnist(args: argparse.Namespace) -> list[str]:
    from cleanprior import TrainConfig
    from cleanprior.data import mnist5k
    from cleanprior.data.files import corrupt_dataset
    from cleanprior.learning.em import EMConfig, EvalConfig, fit_em
    from cleanprior.metrics.frechet import feature_network
    from cleanprior.runs.prior import NetworkConfig, SampleConfig, train_prior

    network = NetworkConfig(channels=(16, 32, 64), blocks=1)
    training = TrainConfig(steps=args.train_steps, batch_size=64, lr=2e-3, warmup=20, ema_decay=0.98,
                           checkpoint_every=100, progress=True)
    features = feature_network("mnist5k")
    test = mnist5k("test")
    rows = []
    for missing in args.missing:
        for seed in args.seeds:
            x = mnist5k("train")[: args.images]
            observations = corrupt_dataset(x, "mask", noise_std=NOISE_STD_MNIST, missing=missing,
                                           generator=torch.Generator().manual_seed(seed))
            run = args.workdir / f"mnist-{int(missing * 100)}-seed{seed}"
            result = fit_em(
                observations, run, network=network,
                config=EMConfig(rounds=args.rounds, steps=16, sampler="ddpm", batch_size=128, solver="gmres",
                                iterations=1, gaussian_rank=32, gaussian_iterations=8, gaussian_samples=1,
                                heldout=64, seed=seed),
                training=training,
                evaluation=EvalConfig(prior_samples=args.eval_samples, posterior_samples=2, steps=32,
                                      reference="mnist5k"),
                resume=(run / "config.json").exists(),
                description=f"MNIST 5k, {missing:.0%} missing",
            )
            # from the rounds' own timings, so that a resumed run reports the whole run's cost
            em_seconds = sum(r.get(k, 0.0) for r in result.metrics for k in ("estep_seconds", "mstep_seconds", "eval_seconds"))
            naive_run = args.workdir / f"mnist-{int(missing * 100)}-naive-seed{seed}"
            masked = observations.operator.adjoint(observations.y)
            total_steps = TrainConfig(**{**training.__dict__, "steps": args.train_steps * args.rounds})
            naive = train_prior(masked, naive_run, network=network, training=total_steps,
                                sampling=SampleConfig(n=args.eval_samples, steps=32), seed=seed,
                                resume=(naive_run / "checkpoint.pt").exists(), description="masked as if clean")
            naive_fd = _fd(naive, features, test, args.eval_samples, seed)
            rows.append({"missing": missing, "seed": seed, "metrics": result.metrics, "naive": naive_fd,
                         "em_seconds": em_seconds})
    clean = {}
    for seed in args.seeds:
        clean_run = args.workdir / f"mnist-clean-seed{seed}"
        total_steps = TrainConfig(**{**training.__dict__, "steps": args.train_steps * args.rounds})
        denoiser = train_prior(mnist5k("train")[: args.images], clean_run, network=network, training=total_steps,
                               sampling=SampleConfig(n=args.eval_samples, steps=32), seed=seed,
                               resume=(clean_run / "checkpoint.pt").exists(), description="clean")
        clean[seed] = _fd(denoiser, features, test, args.eval_samples, seed)
    (args.workdir / "mnist-rows.json").write_text(json.dumps({"rows": rows, "clean": clean}, indent=1, default=str))
    lines = [
        "| missing | Gaussian start FD | EM prior FD (last round) | clean prior FD | masked-as-clean FD | EM / clean |"
        " PSNR mean (dB) | SSIM mean | PPC | EM rounds' time (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for missing in args.missing:
        mine = [r for r in rows if r["missing"] == missing]
        start = [r["metrics"][0].get("frechet", float("nan")) for r in mine]
        last = [r["metrics"][-1].get("frechet", float("nan")) for r in mine]
        upper = [clean[r["seed"]] for r in mine]
        ratio = [a / b for a, b in zip(last, upper)]
        lines.append(
            f"| {missing:.0%} | {mean_spread(start)} | {mean_spread(last)} | {mean_spread(upper)} | "
            f"{mean_spread([r['naive'] for r in mine])} | {mean_spread(ratio)} | "
            f"{mean_spread([r['metrics'][-1].get('psnr_mean', float('nan')) for r in mine])} | "
            f"{mean_spread([r['metrics'][-1].get('ssim_mean', float('nan')) for r in mine])} | "
            f"{mean_spread([r['metrics'][-1].get('ppc', float('nan')) for r in mine])} | "
            f"{mean_spread([r['em_seconds'] for r in mine])} |"
        )
    lines += ["", "Per round (Frechet distance of prior samples, first seed):", ""]
    for r in rows:
        if r["seed"] == args.seeds[0]:
            trail = ", ".join(f"{m.get('frechet', float('nan')):.3g}" for m in r["metrics"])
            lines.append(f"- {r['missing']:.0%} missing: {trail} (round 0 = Gaussian start)")
    return lines


def mnist_full(args: argparse.Namespace) -> list[str]:
    """Issue 14's full-data run: every MNIST 5k training image behind 75 % missing pixels, the
    default U-Net, round by round against a clean prior of the same network at the same steps.

    The clean prior is one training run on the clean images cut at ``k x train_steps`` steps
    (the learning-rate schedule spans all rounds, as one would train it), so that round ``k``'s
    EM prior is compared with a clean prior of the same budget. Both are measured alike: the
    Frechet distance of ``eval_samples`` Heun samples (32 steps) to the test split.
    """
    from cleanprior import PreconditionedDenoiser, TrainConfig, load_denoiser, train
    from cleanprior.data import mnist5k
    from cleanprior.data.files import corrupt_dataset
    from cleanprior.learning.em import EMConfig, EvalConfig, fit_em
    from cleanprior.metrics.frechet import feature_network
    from cleanprior.runs.prior import NetworkConfig, default_network

    device = torch.device(args.device)
    seed = args.seeds[0]
    network = NetworkConfig(channels=(32, 64, 128), blocks=2)
    training = TrainConfig(steps=args.train_steps, batch_size=128, lr=1e-3, warmup=100, ema_decay=0.999,
                           checkpoint_every=500, progress=True)
    features = feature_network("mnist5k")
    test = mnist5k("test")
    x = mnist5k("train")[: args.images]
    observations = corrupt_dataset(x, "mask", noise_std=NOISE_STD_MNIST, missing=args.missing[0],
                                   generator=torch.Generator().manual_seed(seed))
    run = args.workdir / f"full-{int(args.missing[0] * 100)}-seed{seed}"
    began = time.perf_counter()
    result = fit_em(
        observations, run, network=network,
        config=EMConfig(rounds=args.rounds, steps=32, sampler="ddpm", solver="gmres", iterations=2,
                        gaussian_rank=64, gaussian_iterations=8, gaussian_samples=1, heldout=256, seed=seed),
        training=training,
        evaluation=EvalConfig(prior_samples=256, posterior_samples=2, steps=32, reference="mnist5k",
                              every=max(1, args.rounds // 4)),
        device=device, resume=(run / "config.json").exists(), description="MNIST 5k, every training image",
    )
    em_seconds = time.perf_counter() - began
    em_fd = [_fd(load_denoiser(run / "rounds" / f"{k:02d}" / "train.pt", device=device), features, test,
                 args.eval_samples, seed) for k in range(1, args.rounds + 1)]
    clean_path = args.workdir / f"full-clean-seed{seed}.pt"
    whole = TrainConfig(**{**training.__dict__, "steps": args.train_steps * args.rounds})
    torch.manual_seed(seed)
    denoiser = default_network(tuple(x.shape[1:]), network).to(device)
    clean_fd, began = [], time.perf_counter()
    for k in range(1, args.rounds + 1):
        trained = train(denoiser, x.to(device), whole, generator=torch.Generator(device).manual_seed(seed),
                        checkpoint=clean_path, resume=True, until=k * args.train_steps).denoiser
        assert isinstance(trained, PreconditionedDenoiser)
        clean_fd.append(_fd(trained, features, test, args.eval_samples, seed))
    clean_seconds = time.perf_counter() - began
    lines = [
        f"MNIST 5k training images ({len(observations) - 256} observations, 256 held out), "
        f"{args.missing[0]:.0%} missing, noise std {NOISE_STD_MNIST}; U-Net (32, 64, 128), 2 blocks; "
        f"{args.train_steps} M-step steps of batch 128 per round; E-step MMPS, GMRES 2, 32 DDPM steps. "
        f"FD of {args.eval_samples} Heun samples (32 steps) to the test split.",
        "",
        "| round | EM FD | clean FD (same steps) | EM / clean | round s |",
        "|---|---|---|---|---|",
    ]
    for k, (em, clean) in enumerate(zip(em_fd, clean_fd, strict=True), start=1):
        metrics = result.metrics[k] if k < len(result.metrics) else {}
        lines.append(f"| {k} | {em:.4g} | {clean:.4g} | {em / clean:.3g} | "
                     f"{metrics.get('round_seconds', float('nan')):.0f} |")
    lines += ["", f"EM wall time {em_seconds:.0f} s (evaluation included); clean prior {clean_seconds:.0f} s."]
    return lines


def _fd(denoiser, features, test, n: int, seed: int) -> float:
    from cleanprior.diffusion.samplers import sample_prior
    from cleanprior.metrics.frechet import frechet_distance_features

    device = next(denoiser.parameters()).device
    x = sample_prior(denoiser, n, shape=tuple(test.shape[1:]), steps=32, sampler="heun",
                     generator=torch.Generator(device).manual_seed(seed + 99)).cpu()
    return float(frechet_distance_features(x, test, features))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("experiment", choices=("manifold", "mnist", "mnist-full"))
    parser.add_argument("--seeds", default="0,1", help="comma-separated seeds (default 0,1)")
    parser.add_argument("--rounds", type=int, default=None, help="EM rounds (manifold 8, mnist 4)")
    parser.add_argument("--train-steps", type=int, default=None, help="M-step steps per round (manifold 2000, mnist 500)")
    parser.add_argument("--observations", type=int, default=16384, help="manifold: observations")
    parser.add_argument("--images", type=int, default=None, help="mnist: training images (observations; 2048, mnist-full: all)")
    parser.add_argument("--missing", default="0.25,0.5,0.75", help="mnist: missing fractions")
    parser.add_argument("--eval-samples", type=int, default=None, help="prior samples per evaluation (4096 / 1000)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--device", default="cpu", help="mnist-full: where to compute (cuda on a GPU)")
    parser.add_argument("--workdir", type=pathlib.Path, default=pathlib.Path("/tmp/cleanprior-bench-em"))
    parser.add_argument("--output", type=pathlib.Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.seeds = [int(s) for s in args.seeds.split(",") if s]
    args.missing = [float(s) for s in args.missing.split(",") if s]
    low, full = args.experiment == "manifold", args.experiment == "mnist-full"
    args.rounds = args.rounds or (8 if low else 16 if full else 4)
    args.train_steps = args.train_steps or (2000 if low else 1500 if full else 500)
    args.eval_samples = args.eval_samples or (4096 if low else 1000)
    args.images = args.images or (None if full else 2048)
    if full:
        args.missing = args.missing[-1:]
    args.workdir.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    lines = manifold(args) if low else mnist_full(args) if full else mnist(args)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    section = [f"## DiEM `{args.experiment}`, {date}", "", *machine_lines(torch.device(args.device)),
               f"- Total time: {time.perf_counter() - began:.0f} s", "",
               *lines, ""]
    text = "\n".join(section)
    print(text)
    with args.output.open("a") as out:
        out.write("\n" + text)


if __name__ == "__main__":
    main()
