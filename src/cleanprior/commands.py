"""The functions behind the command line, one per command, callable from Python too.

Each reads its inputs (files or embedded datasets), calls the library, writes its outputs and
prints where they went; the parsing of options lives in :mod:`cleanprior.cli`.
"""

from __future__ import annotations

import pathlib
from typing import Any

import torch

from cleanprior.devices import resolve_device

__all__ = ["corrupt", "demo", "evaluate", "fit", "reconstruct", "sample", "train"]


def _save_npz(path: pathlib.Path, **arrays: Any) -> None:
    import numpy as np

    from cleanprior.runs.atomic import atomic_path

    with atomic_path(path) as tmp:
        np.savez(tmp, **{k: v.detach().cpu().numpy() for k, v in arrays.items()})


def corrupt(
    clean: str,
    output: str,
    operator: str = "mask",
    noise_std: float = 0.01,
    split: str = "train",
    limit: int = 0,
    seed: int = 0,
    **options: Any,
) -> None:
    """Corrupt clean data into an observation file (see :func:`cleanprior.data.files.corrupt_dataset`).

    Arguments:
        clean: An embedded dataset's name or a ``.npz`` with clean samples under ``x``.
        output: The observation file to write.
        operator: The operator's name.
        noise_std: The Gaussian noise's standard deviation.
        split: The split of an embedded dataset.
        limit: Keep the first ``limit`` items (0: all).
        seed: The seed of the masks and the noise.
        options: The operator's options (``missing``, ``box``, ``m``, ``kernel_std``, ``factor``,
            ``acceleration``); ``None`` values are left to the defaults.
    """
    from cleanprior.cli import load_data
    from cleanprior.data.files import corrupt_dataset, save_observations

    x = load_data(clean, split)
    if limit:
        x = x[:limit]
    options = {k: v for k, v in options.items() if v is not None}
    observations = corrupt_dataset(x, operator, noise_std=noise_std, generator=torch.Generator().manual_seed(seed),
                                   **options)
    save_observations(output, observations)
    print(f"wrote {output}: {len(observations)} observations through {operator!r}, noise std {noise_std}")


def train(
    data: str,
    output: str,
    network: Any = None,
    training: Any = None,
    sampling: Any = None,
    split: str = "train",
    device: str = "auto",
    seed: int = 0,
    resume: bool = False,
) -> None:
    """Train a prior on clean data into a run folder (:func:`cleanprior.runs.prior.train_prior`)."""
    from cleanprior.cli import load_data
    from cleanprior.runs.prior import train_prior

    target = resolve_device(device)
    x = load_data(data, split)
    train_prior(x, output, network=network, training=training, sampling=sampling, device=target, seed=seed,
                resume=resume, description=f"{data} ({split})")
    print(f"wrote {output}")


def fit(
    observations: str,
    output: str,
    method: str = "diem",
    init_clean: str = "",
    network: Any = None,
    training: Any = None,
    evaluation: Any = None,
    flow: Any = None,
    device: str = "auto",
    resume: bool = False,
    **em: Any,
) -> None:
    """Learn a prior from an observation file (:func:`cleanprior.learning.fit.fit`).

    Arguments:
        observations: The observation file.
        output: The run folder.
        method: The learning method (:data:`cleanprior.learning.fit.LEARNING_METHODS`).
        init_clean: EMDiffusion's clean images (a ``.npz`` with ``x`` or an embedded name).
        network: A :class:`~cleanprior.runs.prior.NetworkConfig`.
        training: A round's :class:`~cleanprior.diffusion.training.TrainConfig`.
        evaluation: An :class:`~cleanprior.learning.em.EvalConfig`.
        flow: FlowDiff's :class:`~cleanprior.learning.flowdiff.FlowDiffConfig`.
        device: Where to compute: ``auto`` (CUDA when available, the default), ``cpu``, ``cuda``, ``cuda:N``.
        resume: Continue the run in ``output``.
        em: The fields of :class:`~cleanprior.learning.em.EMConfig`.
    """
    from cleanprior.data.files import load_clean, load_observations
    from cleanprior.learning.em import EMConfig
    from cleanprior.learning.fit import fit as fit_prior

    target = resolve_device(device)
    # read on the CPU: the run moves its training and held-out parts to the device
    data = load_observations(observations)
    clean = load_clean(init_clean, "train") if init_clean else None
    result = fit_prior(data, output, method=method, init_clean=clean, flow=flow, network=network, config=EMConfig(**em),
                       training=training, evaluation=evaluation, device=target, resume=resume,
                       description=str(observations))
    print(f"wrote {output} ({result.metrics[-1]['round'] if result.metrics else 0} rounds); "
          f"open {pathlib.Path(output) / 'report.html'}")


def sample(
    run: str,
    n: int = 64,
    output: str = "",
    steps: int = 64,
    sampler: str = "heun",
    batch_size: int = 256,
    seed: int = 0,
    device: str = "auto",
) -> None:
    """Draw prior samples from a run into a ``.npz`` under ``x`` (and a PNG grid for images)."""
    from cleanprior.runs.prior import SampleConfig, sample_run

    sampling = SampleConfig(n=n, steps=steps, sampler=sampler, seed=seed, batch_size=batch_size)
    path = sample_run(run, sampling, device=resolve_device(device), output=output or None)
    print(f"wrote {path}")


RECONSTRUCT_CPU_BATCH = 64
"""Observations per batch of ``reconstruct`` on the CPU (each carries ``samples`` samples)."""


def reconstruct(
    run: str,
    observations: str,
    output: str,
    samples: int = 4,
    method: str = "mmps",
    steps: int = 64,
    sampler: str = "ddpm",
    solver: str = "gmres",
    iterations: int = 1,
    batch_size: int = 0,
    seed: int = 0,
    device: str = "auto",
) -> None:
    """Posterior samples of a run's prior for every observation of a file.

    Writes ``x`` (shape ``(N, S, *shape)``), their ``mean`` and pixel-wise ``std`` (``(N,
    *shape)``) to ``output``. ``batch_size`` 0 chooses it from the device: :data:`RECONSTRUCT_CPU_BATCH`
    on the CPU, on a GPU from its free memory (:func:`cleanprior.learning.em.estep_batch_size`).
    """
    from cleanprior.data.files import load_observations
    from cleanprior.learning.em import EMConfig, posterior_batches
    from cleanprior.runs.prior import load_run_prior

    target = resolve_device(device)
    data = load_observations(observations, device=target)
    denoiser = load_run_prior(run, device=target)
    if not batch_size and target.type == "cpu":
        batch_size = RECONSTRUCT_CPU_BATCH
    config = EMConfig(posterior=method, steps=steps, sampler=sampler, solver=solver, iterations=iterations,
                      batch_size=batch_size, samples=samples, seed=seed)
    x = posterior_batches(denoiser, data, config=config, samples=samples, seed_keys=(7,), progress=True,
                          desc="posterior", distribute=False)
    x = x.reshape(len(data), samples, *data.shape)
    _save_npz(pathlib.Path(output), x=x, mean=x.mean(1), std=x.std(1) if samples > 1 else torch.zeros_like(x[:, 0]))
    print(f"wrote {output}: {samples} posterior samples for each of {len(data)} observations")


def evaluate(
    run: str,
    observations: str,
    output: str = "",
    evaluation: Any = None,
    steps: int = 32,
    limit: int = 64,
    seed: int = 0,
    device: str = "auto",
) -> None:
    """Measure a run's prior on observations (see :mod:`cleanprior.learning.evaluation`) into JSON."""
    from cleanprior.data.files import load_observations
    from cleanprior.learning.em import EMConfig, EvalConfig
    from cleanprior.learning.evaluation import evaluate_round
    from cleanprior.runs.atomic import write_json
    from cleanprior.runs.prior import load_run_prior

    target = resolve_device(device)
    data = load_observations(observations, device=target)
    if limit:
        data = data.subset(torch.arange(min(limit, len(data))))
    denoiser = load_run_prior(run, device=target)
    folder = pathlib.Path(output) if output else pathlib.Path(run) / "evaluation"
    metrics = evaluate_round(denoiser, data, folder, evaluation or EvalConfig(),
                             EMConfig(steps=steps, seed=seed), round_index=-1, exact=False, seed=seed, device=target)
    metrics.pop("round")
    write_json(folder / "metrics.json", metrics)
    for key, value in metrics.items():
        print(f"{key}: {value:.4g}")
    print(f"wrote {folder / 'metrics.json'}")


DEMO = {
    "observations": 576,
    "missing": 0.75,
    "noise_std": 0.01,
    "rounds": 4,
}
"""The demo's sizes, chosen to finish in under 10 minutes on 2 CPU cores (set-up included)."""


def demo(output: str = "demo-run", rounds: int = 0, device: str = "auto") -> None:
    """The main job: DiEM on MNIST 5k with 75% of the pixels missing, from the Gaussian start.

    Writes the observation file, then the EM run with its HTML report (``OUTPUT/report.html``):
    prior samples, held-out reconstructions and metrics round by round next to the Gaussian
    start. Re-running continues an interrupted demo in the same folder.
    """
    from cleanprior.data import mnist5k
    from cleanprior.data.files import corrupt_dataset, load_observations, save_observations
    from cleanprior.diffusion.training import TrainConfig
    from cleanprior.learning.em import EMConfig, EvalConfig, fit_em
    from cleanprior.runs.prior import NetworkConfig

    target = resolve_device(device)
    run = pathlib.Path(output)
    path = run / "observations.npz"
    if path.exists():
        # read on the CPU: the run moves its training and held-out parts to the device
        observations = load_observations(path)
    else:
        x = mnist5k("train")[: DEMO["observations"]]
        observations = corrupt_dataset(x, "mask", noise_std=DEMO["noise_std"], missing=DEMO["missing"],
                                       generator=torch.Generator().manual_seed(0))
        run.mkdir(parents=True, exist_ok=True)
        save_observations(path, observations)
    config = EMConfig(rounds=rounds or DEMO["rounds"], posterior="mmps", steps=16, sampler="ddpm", samples=1,
                      batch_size=128, solver="gmres", iterations=1, gaussian_rank=32, gaussian_iterations=8,
                      gaussian_samples=1, heldout=64)
    network = NetworkConfig(channels=(16, 32, 64), blocks=1)
    training = TrainConfig(steps=200, batch_size=64, lr=2e-3, warmup=20, ema_decay=0.98, checkpoint_every=100)
    # measured every other round (the start and the last always): the time saved pays for a fourth
    # round, which takes the Frechet distance of 512 samples from 260 to 176 (RESULTS_EM.md, demo)
    evaluation = EvalConfig(prior_samples=64, posterior_samples=2, shown=8, steps=16, reference="mnist5k", every=2)
    result = fit_em(observations, run, network=network, config=config, training=training, evaluation=evaluation,
                    device=target, resume=(run / "config.json").exists(),
                    description=f"MNIST 5k, {DEMO['observations']} images, {DEMO['missing']:.0%} of pixels missing, "
                                f"noise std {DEMO['noise_std']}")
    for row in result.metrics:
        shown = ", ".join(f"{k} {v:.3g}" for k, v in row.items() if k != "round" and not k.endswith("seconds"))
        print(f"{'Gaussian start' if row['round'] == 0 else 'round ' + str(row['round'])}: {shown}")
    print(f"open {run / 'report.html'}")



def recon(observations: str, output: str, options: Any = None, **arguments: Any) -> None:
    """Train a reconstruction network (:func:`cleanprior.learning.recon.recon_command`).

    Arguments:
        observations: The observation file.
        output: The run folder.
        options: The other :class:`~cleanprior.learning.recon.ReconConfig` fields.
        arguments: ``method``, ``pairs``, ``prior``, ``noise``, ``noise_std``, ``gain``, ``shape``,
            ``device``, ``resume``.
    """
    from cleanprior.learning.recon import recon_command

    arguments["device"] = resolve_device(arguments.get("device", "auto"))
    result = recon_command(observations, output, config=options, **arguments)
    shown = ", ".join(f"{k} {v:.4g}" for k, v in result.metrics.items() if isinstance(v, float))
    print(f"wrote {output}: {shown}; open {pathlib.Path(output) / 'report.html'}")


def apply(run: str, observations: str, output: str, batch_size: int = 256, device: str = "auto") -> None:
    """Reconstruct every observation of a file (:func:`cleanprior.learning.recon.apply_command`)."""
    from cleanprior.learning.recon import apply_command

    apply_command(run, observations, output, batch_size=batch_size, device=resolve_device(device))
    print(f"wrote {output}")
