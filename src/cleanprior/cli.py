"""The ``cleanprior`` command line: each command maps onto one library function.

.. code-block:: text

    cleanprior corrupt CLEAN -o OBS.npz --operator mask --missing 0.75 --noise-std 0.01
    cleanprior train CLEAN -o RUN                      a prior on clean data (the upper bound)
    cleanprior fit OBS.npz -o RUN [--method diem|emdiffusion|flowdiff|ambient|sure|naive|clean]
                   [--rounds K --posterior mmps ...] [--resume]   learn a prior from observations
    cleanprior sample RUN -n N -o SAMPLES.npz          prior samples under 'x'
    cleanprior reconstruct RUN OBS.npz -o POST.npz [--samples S]   posterior samples
    cleanprior evaluate RUN OBS.npz [--reference mnist5k]          the diagnostics and metrics
    cleanprior demo [-o demo-run]                      the main job (what `make demo` runs)
    cleanprior recon OBS.npz -o RUN --method {supervised,sud,sud2,noise2score,sure} [--pairs PAIRS.npz]
                     [--prior PRIOR_RUN] [--noise gaussian|poisson|gamma --noise-std S]
    cleanprior apply RUN OBS.npz -o OUT.npz            reconstructions under 'x', one forward pass

Every option has help text (``cleanprior COMMAND --help``) and can come from a config file
(``--config FILE.yaml``, e.g. one written by ``--print_config``) or a flag; nested options are
spelled ``--training.steps 500``. Commands that make a run folder write the resolved
configuration into it (``config.json``).
"""

from __future__ import annotations

import sys
from typing import Any

from cleanprior.data.files import load_clean as load_data

__all__ = ["load_data", "main", "build_parser"]

DEVICE_HELP = "auto (CUDA when available, else the CPU), cpu, cuda or cuda:N"


def _subparser(description: str) -> Any:
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(description=description)
    parser.add_argument("--config", action=ActionConfigFile, help="options from a YAML/JSON file")
    return parser


def build_parser() -> Any:
    """The parser of every command (exposed for tests and for ``--help``)."""
    from jsonargparse import ArgumentParser

    from cleanprior.diffusion.training import TrainConfig
    from cleanprior.learning.em import EMConfig, EvalConfig
    from cleanprior.learning.flowdiff import FlowDiffConfig
    from cleanprior.runs.prior import NetworkConfig, SampleConfig

    parser = ArgumentParser(prog="cleanprior", description="Clean diffusion priors from corrupted observations.")
    commands = parser.add_subcommands(dest="command")

    corrupt = _subparser("Corrupt clean data into an observation file (y, operator, noise level, and x).")
    corrupt.add_argument("clean", help="an embedded dataset (mnist5k, digits, faces, manifold, mixture) or a .npz with 'x'")
    corrupt.add_argument("-o", "--output", required=True, help="the observation file to write (.npz, .h5)")
    corrupt.add_argument("--operator", default="mask", help="mask, matrix, blur, downsample, fourier or identity")
    corrupt.add_argument("--noise-std", dest="noise_std", type=float, default=0.01, help="Gaussian noise std")
    corrupt.add_argument("--missing", type=float, help="mask: fraction of pixels missing (default 0.75)")
    corrupt.add_argument("--box", type=float, help="mask: side of a missing box, as a fraction of the image side")
    corrupt.add_argument("--m", type=int, help="matrix: rows of the random projection of each item")
    corrupt.add_argument("--kernel-std", dest="kernel_std", type=float, help="blur: Gaussian kernel std in pixels")
    corrupt.add_argument("--factor", type=int, help="downsample: the factor")
    corrupt.add_argument("--acceleration", type=float, help="fourier: undersampling factor")
    corrupt.add_argument("--split", default="train", help="split of an embedded dataset")
    corrupt.add_argument("--limit", type=int, default=0, help="keep the first LIMIT items (0: all)")
    corrupt.add_argument("--seed", type=int, default=0, help="seed of the masks and the noise")
    commands.add_subcommand("corrupt", corrupt, help="corrupt clean data into an observation file")

    train = _subparser("Train a diffusion prior on clean data (the upper bound of every learning method).")
    train.add_argument("data", help="an embedded dataset or a .npz with clean samples under 'x'")
    train.add_argument("-o", "--output", required=True, help="the run folder to create")
    train.add_class_arguments(NetworkConfig, "network")
    train.add_class_arguments(TrainConfig, "training")
    train.add_class_arguments(SampleConfig, "sampling")
    train.add_argument("--split", default="train", help="split of an embedded dataset")
    train.add_argument("--device", default="auto", help=DEVICE_HELP)
    train.add_argument("--seed", type=int, default=0, help="seed of the training generator")
    train.add_argument("--resume", type=bool, default=False, help="continue an interrupted run in OUTPUT")
    commands.add_subcommand("train", train, help="train a prior on clean data")

    fit = _subparser("Learn a clean prior from an observation file (DiEM, EMDiffusion, FlowDiff or a baseline).")
    fit.add_argument("observations", help="an observation file (.npz/.h5, see cleanprior.data.files)")
    fit.add_argument("-o", "--output", required=True, help="the run folder")
    fit.add_argument("--method", default="diem",
                     help="diem, emdiffusion, flowdiff, ambient, sure, naive or clean (a posterior method such as "
                          "mmps means DiEM with that E-step)")
    fit.add_argument("--init-clean", dest="init_clean", default="",
                     help="emdiffusion: a .npz holding a few clean images under 'x' (or an embedded dataset's name)")
    fit.add_class_arguments(EMConfig)
    fit.add_class_arguments(NetworkConfig, "network")
    fit.add_class_arguments(TrainConfig, "training")
    fit.add_class_arguments(EvalConfig, "evaluation")
    fit.add_class_arguments(FlowDiffConfig, "flow", skip={"steps", "seed"})
    fit.add_argument("--device", default="auto", help=DEVICE_HELP + " (under torchrun: each rank its GPU)")
    fit.add_argument("--resume", type=bool, default=False, help="continue the run in OUTPUT from its last completed work")
    commands.add_subcommand("fit", fit, help="learn a prior from observations (EM and the other methods)")

    sample = _subparser("Draw prior samples from a run into a .npz (under 'x'; a PNG grid beside it for images).")
    sample.add_argument("run", help="a run folder (train, fit or demo)")
    sample.add_argument("-n", type=int, default=64, help="number of samples")
    sample.add_argument("-o", "--output", default="", help="the .npz to write (default RUN/samples.npz)")
    sample.add_argument("--steps", type=int, default=64, help="sampler steps")
    sample.add_argument("--sampler", default="heun", help="ddim, ddpm, heun or pc")
    sample.add_argument("--batch-size", dest="batch_size", type=int, default=256, help="samples per denoiser call")
    sample.add_argument("--seed", type=int, default=0, help="seed of the sampler")
    sample.add_argument("--device", default="auto", help=DEVICE_HELP)
    commands.add_subcommand("sample", sample, help="draw prior samples from a run")

    reconstruct = _subparser("Posterior samples of a run's prior for every observation of a file.")
    reconstruct.add_argument("run", help="a run folder")
    reconstruct.add_argument("observations", help="an observation file")
    reconstruct.add_argument("-o", "--output", required=True, help="the .npz to write: x (N, S, *shape), mean, std")
    reconstruct.add_argument("--samples", type=int, default=4, help="posterior samples per observation")
    reconstruct.add_argument("--method", default="mmps", help="any posterior method (dps, mmps, tds, daps, ...)")
    reconstruct.add_argument("--steps", type=int, default=64, help="sampler steps")
    reconstruct.add_argument("--sampler", default="ddpm", help="ddim, ddpm, heun or pc")
    reconstruct.add_argument("--solver", default="gmres", help="Krylov solver of MMPS-like methods")
    reconstruct.add_argument("--iterations", type=int, default=1, help="its iterations")
    reconstruct.add_argument("--batch-size", dest="batch_size", type=int, default=0,
                             help="observations per batch (0: from the device: 64 on the CPU, on a GPU what half "
                                  "its free memory holds)")
    reconstruct.add_argument("--seed", type=int, default=0, help="seed of the sampler")
    reconstruct.add_argument("--device", default="auto", help=DEVICE_HELP)
    commands.add_subcommand("reconstruct", reconstruct, help="posterior samples for observations")

    evaluate = _subparser("Measure a run's prior: diagnostics on observations, distances to clean data.")
    evaluate.add_argument("run", help="a run folder")
    evaluate.add_argument("observations", help="an observation file (its 'x', when present, gives PSNR/SSIM)")
    evaluate.add_argument("-o", "--output", default="", help="where to write metrics.json and figures (default RUN/evaluation)")
    evaluate.add_class_arguments(EvalConfig, "evaluation")
    evaluate.add_argument("--steps", type=int, default=32, help="sampler steps")
    evaluate.add_argument("--limit", type=int, default=64, help="observations used (0: all)")
    evaluate.add_argument("--seed", type=int, default=0, help="seed")
    evaluate.add_argument("--device", default="auto", help=DEVICE_HELP)
    commands.add_subcommand("evaluate", evaluate, help="metrics of a run's prior")

    demo = _subparser(
        "The main job: DiEM on MNIST 5k with 75% of the pixels missing, from the Gaussian start, with an HTML "
        "report of the prior improving round by round. Re-running continues an interrupted demo."
    )
    demo.add_argument("-o", "--output", default="demo-run", help="the run folder")
    demo.add_argument("--rounds", type=int, default=0, help="EM rounds (0: the demo's default)")
    demo.add_argument("--device", default="auto", help=DEVICE_HELP)
    commands.add_subcommand("demo", demo, help="the main job (what `make demo` runs)")

    from cleanprior.learning.recon import METHODS as RECON_METHODS
    from cleanprior.learning.recon import ReconConfig

    recon = _subparser("Train a reconstruction network y -> x with few or no clean pairs (SUD, SUD^2, Noise2Score, SURE).")
    recon.add_argument("observations", help="an observation file, or a .npz holding 'y' (and optionally 'x' for metrics)")
    recon.add_argument("-o", "--output", required=True, help="the run folder")
    recon.add_argument("--method", default="sud2", choices=RECON_METHODS,
                       help="supervised (pairs only), sud, sud2 (pairs + observations + a prior), noise2score or sure "
                            "(observations only)")
    recon.add_argument("--pairs", default="", help="a .npz with a few clean images 'x' and their observations 'y'")
    recon.add_argument("--prior", default="",
                       help="sud/sud2: a prior's run folder (cleanprior train, or cleanprior fit on the observations "
                            "themselves: then the few pairs are the only clean images)")
    recon.add_argument("--noise", default="gaussian", choices=("gaussian", "poisson", "gamma"),
                       help="noise2score: the noise model")
    recon.add_argument("--noise-std", dest="noise_std", type=float, default=0.0,
                       help="the Gaussian noise level (0: the file's)")
    recon.add_argument("--gain", type=float, default=0.0, help="noise2score, Poisson: the gain (y = gain * Poisson(x / gain))")
    recon.add_argument("--shape", type=float, default=0.0, help="noise2score, Gamma: the shape (y = x * Gamma(shape, rate))")
    recon.add_class_arguments(ReconConfig, "options", skip={"method", "noise", "noise_std", "gain", "shape"})
    recon.add_argument("--device", default="auto", help=DEVICE_HELP)
    recon.add_argument("--resume", type=bool, default=False, help="continue the run in OUTPUT")
    commands.add_subcommand("recon", recon, help="train a reconstruction network")

    apply = _subparser("Reconstruct every observation of a file with a recon run's network, in one forward pass per batch.")
    apply.add_argument("run", help="a run folder of cleanprior recon")
    apply.add_argument("observations", help="an observation file or a .npz holding 'y'")
    apply.add_argument("-o", "--output", required=True, help="the .npz to write, reconstructions under 'x'")
    apply.add_argument("--batch-size", dest="batch_size", type=int, default=256, help="observations per forward pass")
    apply.add_argument("--device", default="auto", help=DEVICE_HELP)
    commands.add_subcommand("apply", apply, help="apply a reconstruction network")
    return parser


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``cleanprior`` command."""
    from cleanprior import commands

    parser = build_parser()
    config = parser.parse_args(argv if argv is not None else sys.argv[1:])
    name = config.command
    options = parser.instantiate(config)[name]
    options = {k: v for k, v in vars(options).items() if k not in ("config", "__path__")}
    getattr(commands, name)(**options)


if __name__ == "__main__":
    main()
