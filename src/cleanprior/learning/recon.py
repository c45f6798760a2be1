r"""Reconstruction runs: train a network that maps an observation to an image in one pass.

Five ways of training a U-Net :math:`f_\theta: y \mapsto \hat x` (no noise conditioning), all
run the same way as ``cleanprior fit`` (a run folder with the resolved configuration, a
resumable checkpoint, metrics, figures and an HTML report):

- ``"supervised"``: the paired loss :math:`\operatorname{mean} \|x_p - f(y_p)\|^2` on a few
  pairs alone, the baseline (:func:`~cleanprior.learning.sud.train_reconstruction`);
- ``"sud"`` and ``"sud2"``: the same plus pseudo-labels of the unpaired observations from a
  prior denoiser (one denoising step, or a short reverse diffusion) and a decorrelation of the
  latents (:mod:`cleanprior.learning.sud`, MATH.md section 4). The forward model may be unknown;
- ``"noise2score"``: denoising from noisy images alone, by Tweedie's formula for Gaussian,
  Poisson or Gamma noise applied to a learned score of the noisy data
  (:mod:`cleanprior.learning.noise2score`, MATH.md section 5);
- ``"sure"``: denoising from images with Gaussian noise alone, by minimising Stein's unbiased
  risk estimate (:func:`~cleanprior.learning.sure.train_sure_denoiser`).

The prior of SUD and SUD² is any denoiser. It may come from ``cleanprior train`` on clean
images, as in the papers, or from ``cleanprior fit`` on the observations themselves (DiEM's
expectation-maximisation): then no clean image is needed anywhere, apart from the few pairs,
which no published SUD variant offers.

With :math:`f(y) = y + U(y)` (``residual``, when observations and images have the same shape)
the untrained network is the identity, since the U-Net's last convolution starts at zero; the
score network of Noise2Score is never residual (its untrained score 0 gives
:math:`\hat x = y` for Gaussian noise).

.. code-block:: text

    RUN/config.json          the resolved configuration (method, data, every option)
    RUN/train.pt             the training checkpoint (resume continues from it)
    RUN/model.pt             what load_reconstruction(RUN) rebuilds: y -> x in one forward pass
    RUN/metrics.json         held-out PSNR/SSIM (and Frechet distance), timings, loss history
    RUN/reconstructions.png  rows: truth (when known), observation, reconstruction
    RUN/loss.png, RUN/report.html

References:
    Chan, Young & Metzler (2023). SUD²: Supervision by Denoising Diffusion Models for Image
    Reconstruction. https://arxiv.org/abs/2303.09642
    Kim & Ye (2021). Noise2Score: Tweedie's Approach to Self-Supervised Image Denoising without
    Clean Images. NeurIPS. https://arxiv.org/abs/2106.07009
    Metzler, Mousavi, Heckel & Baraniuk (2018). Unsupervised Learning with Stein's Unbiased
    Risk Estimator. https://arxiv.org/abs/1805.10531
    Rozet et al. (2024). Learning Diffusion Priors from Observations by Expectation
    Maximization (DiEM). https://arxiv.org/abs/2405.13712
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import pathlib
import time
from typing import Any

import torch
from torch import Tensor, nn

from cleanprior.devices import resolve_device
from cleanprior.diffusion.denoiser import Denoiser
from cleanprior.learning.noise2score import NOISE_PARAMETERS, ScoreConfig
from cleanprior.learning.sud import SUDConfig
from cleanprior.learning.sure import SUREConfig
from cleanprior.runs.atomic import write_json

__all__ = [
    "METHODS",
    "ReconConfig",
    "ReconResult",
    "Residual",
    "apply_command",
    "apply_reconstruction",
    "fit_reconstruction",
    "load_reconstruction",
    "recon_command",
]

METHODS = ("supervised", "sud", "sud2", "noise2score", "sure")
"""The training methods; the first three learn from pairs, the last two from noisy images alone."""

PAIRED = ("supervised", "sud", "sud2")
MODEL_KIND = "reconstruction-model"


@dataclasses.dataclass
class ReconConfig:
    r"""A reconstruction run's options.

    Attributes:
        method: One of :data:`METHODS`.
        channels: The U-Net's channels per level (its levels halve the resolution, so the
            images' sides must be divisible by :math:`2^{L - 1}`).
        blocks: The U-Net's residual blocks per level.
        residual: Predict :math:`\hat x = y + U(y)` (the untrained network is the identity);
            resolved to False where observations and images differ in shape, and for
            Noise2Score (whose network is a score).
        noise: The noise model of ``noise2score`` (``"gaussian"``, ``"poisson"`` or
            ``"gamma"``); ``sure`` takes Gaussian noise only.
        noise_std: The Gaussian noise's :math:`\sigma` (0: taken from the observations when
            they record Gaussian noise of one level).
        gain: The Poisson gain :math:`\zeta` (:math:`y = \zeta\, \mathcal{P}(x / \zeta)`).
        shape: The Gamma shape :math:`\alpha` (:math:`y = x\, G`, :math:`G \sim
            \Gamma(\alpha, \beta)`).
        rate: The Gamma rate :math:`\beta` (0: :math:`\alpha`, unit-mean noise).
        seed: The seed of the initial weights, the held-out split and the training draws.
        heldout: Observations held out of training, on which the run is measured.
        reference: An embedded dataset's name: the Frechet distance of the held-out
            reconstructions to its test split (``""``: none).
        data_range: The width of the images' range for PSNR and SSIM (2 for [-1, 1]).
        shown: Held-out observations drawn in ``reconstructions.png``.
        batch_size: Observations per forward pass when reconstructing.
        sud: The options of ``supervised``, ``sud`` and ``sud2`` (its ``method`` follows
            ``method``).
        score: The options of ``noise2score``'s score training.
        sure: The options of ``sure``'s training.
    """

    method: str = "sud2"
    channels: tuple[int, ...] = (32, 64, 128)
    blocks: int = 1
    residual: bool = True
    noise: str = "gaussian"
    noise_std: float = 0.0
    gain: float = 0.0
    shape: float = 0.0
    rate: float = 0.0
    seed: int = 0
    heldout: int = 0
    reference: str = ""
    data_range: float = 2.0
    shown: int = 8
    batch_size: int = 256
    sud: SUDConfig = dataclasses.field(default_factory=SUDConfig)
    score: ScoreConfig = dataclasses.field(default_factory=ScoreConfig)
    sure: SUREConfig = dataclasses.field(default_factory=SUREConfig)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(
                f"ReconConfig.method must be one of {list(METHODS)}, got {self.method!r}"
            )
        self.channels = tuple(self.channels)
        if not self.channels or any(
            isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in self.channels
        ):
            raise ValueError(
                f"ReconConfig.channels must be positive integers, one per level, got {self.channels!r}"
            )
        for name in ("blocks", "shown", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ReconConfig.{name} must be a positive integer, got {value!r}")
        for name in ("seed", "heldout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(
                    f"ReconConfig.{name} must be a non-negative integer, got {value!r}"
                )
        if self.noise not in NOISE_PARAMETERS:
            raise ValueError(
                f"ReconConfig.noise must be one of {sorted(NOISE_PARAMETERS)}, got {self.noise!r}"
            )
        for name in ("noise_std", "gain", "shape", "rate"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"ReconConfig.{name} must be a non-negative number, got {value!r}")
        if not self.data_range > 0:
            raise ValueError(f"ReconConfig.data_range must be positive, got {self.data_range}")
        for name, kind in (("sud", SUDConfig), ("score", ScoreConfig), ("sure", SUREConfig)):
            if not isinstance(getattr(self, name), kind):
                raise TypeError(
                    f"ReconConfig.{name} must be a {kind.__name__}, got {type(getattr(self, name)).__name__}"
                )
        if self.method in PAIRED and self.sud.method != self.method:
            self.sud = dataclasses.replace(self.sud, method=self.method)

    @classmethod
    def from_dict(cls, options: dict[str, Any]) -> ReconConfig:
        """Build a configuration from plain data (a ``config.json``'s ``config`` entry).

        Arguments:
            options: The fields; ``sud``, ``score`` and ``sure`` as dicts of their fields.

        Raises:
            ValueError: For an unknown field (named) or an invalid value.
        """
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"unknown ReconConfig fields: {', '.join(unknown)}")
        values = dict(options)
        for name, kind in (("sud", SUDConfig), ("score", ScoreConfig), ("sure", SUREConfig)):
            if isinstance(values.get(name), dict):
                fields = {f.name for f in dataclasses.fields(kind)}
                extra = sorted(set(values[name]) - fields)
                if extra:
                    raise ValueError(f"unknown {kind.__name__} fields: {', '.join(extra)}")
                values[name] = kind(**values[name])
        return cls(**values)

    def noise_parameters(self) -> dict[str, float]:
        """The parameters of :class:`~cleanprior.learning.noise2score.Noise2Score` for ``noise``."""
        if self.noise == "gaussian":
            return {"std": float(self.noise_std)}
        if self.noise == "poisson":
            return {"gain": float(self.gain)}
        return {"shape": float(self.shape), **({"rate": float(self.rate)} if self.rate else {})}


@dataclasses.dataclass
class ReconResult:
    """What :func:`fit_reconstruction` returns.

    Attributes:
        network: The trained map from observations ``(B, *y_shape)`` to images
            ``(B, *x_shape)`` (one forward pass), in eval mode.
        metrics: What ``RUN/metrics.json`` holds.
    """

    network: nn.Module
    metrics: dict[str, Any]


class Residual(nn.Module):
    r""":math:`f(y) = y + U(y)`: a network that predicts the correction of its input.

    Arguments:
        network: :math:`U`, mapping ``(B, *shape)`` to ``(B, *shape)``.
    """

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, y: Tensor) -> Tensor:
        """Shape ``(B, *shape)`` to ``(B, *shape)``."""
        return y + self.network(y)


def _build(spec: dict[str, Any]) -> nn.Module:
    """The trainable module a model description names (weights left as initialised)."""
    from cleanprior.nn import build_network

    network = build_network(spec["network"]["name"], **spec["network"]["config"])
    return Residual(network) if spec["residual"] else network


def _wrap(trainable: nn.Module, spec: dict[str, Any]) -> nn.Module:
    """The map ``y -> x`` around a trained module (Noise2Score's Tweedie formula)."""
    if spec["method"] != "noise2score":
        return trainable
    from cleanprior.learning.noise2score import Noise2Score

    noise = dict(spec["noise"])
    return Noise2Score(trainable, noise.pop("name"), **noise)


def _check_images(name: str, value: Tensor, levels: int) -> None:
    """Refuse what the U-Net cannot take: non-images, complex or non-finite values, odd sides."""
    if not isinstance(value, Tensor) or value.ndim != 4 or value.shape[0] == 0:
        got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(f"{name} must be a batch of images (N, C, H, W) with N >= 1, got {got}")
    if not value.is_floating_point():
        raise ValueError(f"{name} must hold real floating-point values, got {value.dtype}")
    if not torch.isfinite(value).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    factor = 2 ** (levels - 1)
    if value.shape[-1] % factor or value.shape[-2] % factor:
        raise ValueError(
            f"{name} has sides {tuple(value.shape[-2:])}, not divisible by 2^(levels - 1) = {factor} "
            f"for a U-Net of {levels} levels: use fewer ReconConfig.channels"
        )


def _resolve(
    observations: Any,
    config: ReconConfig,
    pairs: tuple[Tensor, Tensor] | None,
    prior: Denoiser | None,
) -> tuple[ReconConfig, tuple[int, ...]]:
    """Validate the data against the method (before any work): the resolved config and x's shape."""
    from cleanprior.data.files import Observations

    if not isinstance(config, ReconConfig):
        raise TypeError(f"config must be a ReconConfig, got {type(config).__name__}")
    if not isinstance(observations, Observations):
        raise TypeError(
            f"observations must be cleanprior.data.files.Observations, got {type(observations).__name__}"
        )
    method, levels = config.method, len(config.channels)
    y = observations.y
    _check_images("the observations y", y, levels)
    if config.heldout >= len(observations):
        raise ValueError(
            f"heldout={config.heldout} leaves no observation to learn from out of {len(observations)}"
        )
    if method in PAIRED:
        if pairs is None:
            raise ValueError(
                f"method {method!r} needs pairs (x, y) of clean images and their observations"
            )
        if not isinstance(pairs, (tuple, list)) or len(pairs) != 2:
            raise ValueError("pairs must be a tuple (x, y) of clean images and their observations")
        x_p, y_p = pairs
        _check_images("the pairs' x", x_p, levels)
        _check_images("the pairs' y", y_p, levels)
        if x_p.shape[0] != y_p.shape[0]:
            raise ValueError(
                f"the pairs hold {x_p.shape[0]} images x but {y_p.shape[0]} observations y"
            )
        if y_p.shape[1:] != y.shape[1:]:
            raise ValueError(
                f"the pairs' observations have shape {tuple(y_p.shape[1:])}, the observations {tuple(y.shape[1:])}"
            )
        if x_p.shape[-2:] != y.shape[-2:]:
            raise ValueError(
                f"the pairs' images have sides {tuple(x_p.shape[-2:])} but the observations {tuple(y.shape[-2:])}: "
                "the U-Net maps an observation to an image of its own size"
            )
        x_shape = tuple(x_p.shape[1:])
        if method != "supervised" and prior is None:
            raise ValueError(
                f"method {method!r} needs a prior denoiser (e.g. from cleanprior train or fit)"
            )
        if method == "supervised" and prior is not None:
            raise ValueError("method 'supervised' learns from the pairs alone; it takes no prior")
    else:
        if pairs is not None:
            raise ValueError(
                f"method {method!r} learns from the noisy observations alone; it takes no pairs"
            )
        if prior is not None:
            raise ValueError(f"method {method!r} takes no prior")
        x_shape = tuple(y.shape[1:])
    if observations.x is not None and tuple(observations.x.shape[1:]) != x_shape:
        raise ValueError(
            f"the observations' ground truth x has shape {tuple(observations.x.shape[1:])}, the images {x_shape}"
        )

    updates: dict[str, Any] = {
        "residual": config.residual and method != "noise2score" and tuple(y.shape[1:]) == x_shape
    }
    if method == "sure" and config.noise != "gaussian":
        raise ValueError(f"method 'sure' takes Gaussian noise, not {config.noise!r}")
    if method in ("noise2score", "sure"):
        if config.noise == "gaussian" and config.noise_std == 0:
            recorded = observations.noise_std
            if observations.noise == "gaussian" and isinstance(recorded, float) and recorded > 0:
                updates["noise_std"] = recorded
            else:
                raise ValueError(
                    f"method {method!r} needs the Gaussian noise level: set noise_std (--noise-std)"
                )
        if config.noise == "poisson":
            if config.gain <= 0:
                raise ValueError(
                    "method 'noise2score' with Poisson noise needs its gain (gain > 0)"
                )
            if (y < 0).any():
                raise ValueError("Poisson observations y = gain * counts must be non-negative")
        if config.noise == "gamma":
            if config.shape <= 0:
                raise ValueError(
                    "method 'noise2score' with Gamma noise needs its shape (shape > 0)"
                )
            if (y <= 0).any():
                raise ValueError("Gamma observations y = x G must be positive (the law's support)")
    return dataclasses.replace(config, **updates), x_shape


def _comparable(settings: Any) -> Any:
    """Settings without what may change on resume (device, checkpoint periods)."""
    if isinstance(settings, dict):
        return {
            k: _comparable(v)
            for k, v in settings.items()
            if k not in ("device", "checkpoint_every")
        }
    return settings


def _history_plot(history: dict[str, list[float]], path: pathlib.Path) -> None:
    """The training curves, raw and smoothed over 50 steps, one panel each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cleanprior.runs.atomic import atomic_path

    names = [k for k, v in history.items() if any(v)]
    figure, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3), squeeze=False)
    for axis, name in zip(axes[0], names, strict=True):
        values = torch.tensor(history[name], dtype=torch.float64)
        window = min(50, len(values))
        smooth = values.unfold(0, window, 1).mean(1)
        axis.plot(range(len(values)), values, color="tab:gray", alpha=0.4, linewidth=0.8)
        axis.plot(range(window - 1, len(values)), smooth, color="tab:blue")
        axis.set_title(name, fontsize=9)
        axis.set_xlabel("step")
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=90)
    plt.close(figure)


def _write_report(run: pathlib.Path, settings: dict[str, Any], metrics: dict[str, Any]) -> None:
    """``RUN/report.html``: the metrics, the figures and the configuration (relative links)."""
    import html

    from cleanprior.runs.atomic import atomic_path

    rows = "".join(
        f"<tr><th>{html.escape(k)}</th><td>{v:.4g}</td></tr>"
        if isinstance(v, float)
        else f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>"
        for k, v in metrics.items()
        if not isinstance(v, (dict, list))
    )
    figures = "".join(
        f"<figure><img src='{name}'><figcaption>{caption}</figcaption></figure>"
        for name, caption in (
            ("reconstructions.png", "rows: truth (when known), observation, reconstruction"),
            ("loss.png", "training losses (gray: per step; blue: mean of 50 steps)"),
        )
        if (run / name).exists()
    )
    description = settings["observations"]["description"]
    page = f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>cleanprior recon {html.escape(run.resolve().name)}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:70em}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}} img{{image-rendering:pixelated;max-width:100%}}
figure img{{width:36em}} figure{{margin:0 0 1em 0}}</style></head>
<body><h1>Reconstruction run {html.escape(run.resolve().name)}: {html.escape(settings["config"]["method"])}</h1>
<p>{html.escape(description)}</p>
<h2>Metrics (held-out observations)</h2><table>{rows}</table>
<h2>Figures</h2>{figures}
<h2>Configuration</h2><pre>{html.escape(json.dumps(settings, indent=2, default=str))}</pre>
</body></html>
"""
    with atomic_path(run / "report.html") as tmp:
        tmp.write_text(page)


def _evaluate(
    model: nn.Module, shown: Any, heldout: Any, config: ReconConfig, run: pathlib.Path
) -> dict[str, Any]:
    """Metrics on the held-out observations and the reconstruction figure."""
    from cleanprior.runs.report import save_image_grid

    metrics: dict[str, Any] = {"heldout": 0 if heldout is None else len(heldout)}
    if heldout is not None:
        began = time.perf_counter()
        x_hat = apply_reconstruction(model, heldout.y, batch_size=config.batch_size)
        metrics["seconds_per_image"] = (time.perf_counter() - began) / len(heldout)
        truth = heldout.x
        if truth is not None:
            from cleanprior.metrics.image import psnr, ssim

            truth = truth.to(x_hat)
            # the standard 11-pixel window, narrowed (odd) for images smaller than it
            side = min(truth.shape[-2:])
            window = min(11, side if side % 2 else side - 1)
            metrics["psnr"] = float(psnr(x_hat, truth, config.data_range).mean())
            metrics["ssim"] = float(ssim(x_hat, truth, config.data_range, window=window).mean())
            if heldout.y.shape == truth.shape:
                y = heldout.y.to(truth)
                metrics["psnr_input"] = float(psnr(y, truth, config.data_range).mean())
                metrics["ssim_input"] = float(
                    ssim(y, truth, config.data_range, window=window).mean()
                )
        if config.reference and len(heldout) >= 2:
            from cleanprior.data.files import load_clean
            from cleanprior.metrics.frechet import feature_network, frechet_distance_features

            network = feature_network(config.reference)
            metrics["frechet"] = float(
                frechet_distance_features(x_hat, load_clean(config.reference, "test"), network)
            )
    k = min(config.shown, len(shown))
    some = shown.subset(torch.arange(k))
    x_hat = apply_reconstruction(model, some.y, batch_size=config.batch_size).cpu()
    rows = [] if some.x is None else [some.x.cpu()]
    if some.y.shape[1:] == x_hat.shape[1:]:
        rows.append(some.y.cpu())
    rows.append(x_hat)
    grid = torch.cat(rows)
    low = 0.0 if (torch.cat(rows[:-1] or rows) >= 0).all() else -config.data_range / 2
    save_image_grid(
        grid,
        run / "reconstructions.png",
        nrow=k,
        value_range=(low, low + config.data_range),
    )
    return metrics


def _settings(
    observations: Any,
    config: ReconConfig,
    pairs: tuple[Tensor, Tensor] | None,
    prior: Denoiser | None,
    description: str,
    device: str | torch.device,
    x_shape: tuple[int, ...],
) -> dict[str, Any]:
    """What ``RUN/config.json`` records (plain data): a resumed run must match it."""
    data = {
        "description": description,
        "count": len(observations),
        "y_shape": list(observations.y.shape[1:]),
        "has_x": observations.x is not None,
    }
    paired = None if pairs is None else {"count": int(pairs[0].shape[0]), "x_shape": list(x_shape)}
    denoiser = None
    if prior is not None:
        size = sum(p.numel() for p in prior.parameters()) if isinstance(prior, nn.Module) else 0
        denoiser = {"class": type(prior).__name__, "parameters": size}
    settings = {
        "command": "recon",
        "observations": data,
        "pairs": paired,
        "prior": denoiser,
        "config": dataclasses.asdict(config),
        "device": str(device),
    }
    return json.loads(json.dumps(settings, default=str))


def fit_reconstruction(
    observations: Any,
    run: str | os.PathLike[str],
    *,
    config: ReconConfig | None = None,
    pairs: tuple[Tensor, Tensor] | None = None,
    prior: Denoiser | None = None,
    resume: bool = False,
    progress: bool = True,
    description: str = "",
    device: str | torch.device = "cpu",
) -> ReconResult:
    r"""Train a reconstruction network into a run folder, measure it and write its report.

    ``config.heldout`` observations, the first of ``torch.randperm(N, generator=
    round_generator(config.seed, 1))``, are kept out of training; the trained map is measured on
    them (PSNR and SSIM when the observations carry their ground truth ``x``, with the input's own
    as a baseline when it has the image's shape; the Frechet distance to the test split of
    ``config.reference`` when one is named; seconds per image) and drawn in
    ``reconstructions.png`` (the first training observations when none is held out). The methods
    see ``observations.y`` only, never its operator or ground truth.

    Arguments:
        observations: An :class:`~cleanprior.data.files.Observations` of images
            ``(N, C, H, W)``: the unpaired observations of ``sud``/``sud2``, the noisy images of
            ``noise2score``/``sure``, held-out test observations only for ``supervised``.
        run: The run folder.
        config: The options (the defaults of :class:`ReconConfig` when omitted).
        pairs: ``(x_p, y_p)``, clean images ``(N_p, *x_shape)`` and their observations
            ``(N_p, *y_shape)``; required by ``supervised``, ``sud`` and ``sud2``, refused by the
            others.
        prior: The prior denoiser ``D(x_t, sigma)`` of ``sud`` and ``sud2`` (on ``device``, in
            eval mode), e.g. ``load_denoiser(RUN / "checkpoint.pt")`` of a ``train`` or ``fit``
            run; refused by the others.
        resume: Continue the run in ``run`` (its configuration must match).
        progress: Show progress bars.
        description: What the observations are (recorded).
        device: Where the network trains (``"auto"``: CUDA when available); the observations stay
            where they are and move to it batch by batch.

    Returns:
        The trained map and its metrics.

    Raises:
        FileExistsError: If ``run`` holds a run and ``resume`` is False (nothing is touched).
        ValueError: If the data do not suit the method (missing pairs or prior, shapes, NaN,
            noise parameters) or a resumed run was configured otherwise; before anything is
            written.
    """
    from cleanprior import __version__
    from cleanprior.learning.rounds import round_generator
    from cleanprior.nn import UNet
    from cleanprior.runs.checkpoint import save_checkpoint

    config, x_shape = _resolve(observations, config or ReconConfig(), pairs, prior)
    device = resolve_device(device)
    run = pathlib.Path(run)
    method = config.method
    y_shape = tuple(observations.y.shape[1:])
    settings = _settings(observations, config, pairs, prior, description, device, x_shape)
    if (run / "config.json").exists():
        if not resume:
            raise FileExistsError(
                f"{run} already holds a run; pass resume=True (--resume) to continue it, or choose another folder"
            )
        from cleanprior.runs.config import with_defaults

        previous = json.loads((run / "config.json").read_text())
        # options added since the folder was written count as having had their defaults
        defaults = json.loads(json.dumps(dataclasses.asdict(ReconConfig()), default=str))
        previous["config"] = with_defaults(previous.get("config", {}), defaults)
        now, before = _comparable(settings), _comparable(previous)
        changed = sorted(k for k in set(now) | set(before) if now.get(k) != before.get(k))
        if changed:
            raise ValueError(
                f"cannot resume {run}: its {', '.join(changed)} configuration differs from the one given"
            )
    run.mkdir(parents=True, exist_ok=True)
    write_json(run / "config.json", settings)

    split = torch.randperm(len(observations), generator=round_generator(config.seed, 1))
    heldout = observations.subset(split[: config.heldout]) if config.heldout else None
    training = observations.subset(split[config.heldout :].sort().values)
    noise = {"name": config.noise, **config.noise_parameters()}
    spec = {
        "method": method,
        "network": {"name": "UNet", "config": None},
        "residual": config.residual,
        "noise": noise if method == "noise2score" else None,
    }
    # the initial weights are a function of the seed, without touching the caller's global generator
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        network = UNet(
            y_shape[0],
            x_shape[0],
            channels=config.channels,
            blocks=config.blocks,
            noise_conditioning=False,
        )
    spec["network"]["config"] = network.config
    trainable = (Residual(network) if config.residual else network).to(device)
    generator = round_generator(config.seed, 2)
    checkpoint = run / "train.pt"
    began = time.perf_counter()
    if method in PAIRED:
        from cleanprior.learning.sud import train_reconstruction

        # the decorrelation reads the U-Net's own module, one level down in the residual wrapper
        sud = config.sud
        if config.residual:
            sud = dataclasses.replace(sud, latent=f"network.{sud.latent}")
        result = train_reconstruction(
            trainable,
            (pairs[0], pairs[1]),
            None if method == "supervised" else training.y,
            prior,
            sud,
            generator=generator,
            checkpoint=checkpoint,
            resume=resume,
            progress=progress,
        )
        trained, history = result.network, result.history
    elif method == "noise2score":
        from cleanprior.learning.noise2score import train_score

        score = train_score(
            trainable,
            training.y,
            config.score,
            generator=generator,
            checkpoint=checkpoint,
            resume=resume,
            progress=progress,
        )
        trained, history = score.network, {"ardae": score.losses}
    else:
        from cleanprior.learning.sure import train_sure_denoiser

        sure = train_sure_denoiser(
            trainable,
            training.y,
            config.noise_std,
            config.sure,
            generator=generator,
            checkpoint=checkpoint,
            resume=resume,
            progress=progress,
        )
        trained, history = sure.network, {"sure (estimated mse per entry)": sure.losses}
    train_seconds = time.perf_counter() - began
    created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    save_checkpoint(
        run / "model.pt",
        {
            "kind": MODEL_KIND,
            "model": spec,
            "state_dict": {k: v.detach().cpu() for k, v in trained.state_dict().items()},
            "metadata": {
                "created": created,
                "cleanprior_version": __version__,
                "description": description,
                "y_shape": list(y_shape),
                "x_shape": list(x_shape),
                "config": settings["config"],
            },
        },
    )
    model = _wrap(trained, spec).eval()
    losses = next(iter(history.values()))
    # the seconds of this call's training; the step count says how much of the run it covers
    metrics: dict[str, Any] = {
        "method": method,
        "parameters": sum(p.numel() for p in trained.parameters()),
        "steps": len(losses),
        "train_seconds": train_seconds,
        "final_loss": sum(losses[-50:]) / len(losses[-50:]),
    }
    shown = heldout if heldout is not None else training
    metrics.update(_evaluate(model, shown, heldout, config, run))
    metrics["history"] = history
    _history_plot(history, run / "loss.png")
    write_json(run / "metrics.json", metrics)
    _write_report(run, settings, metrics)
    return ReconResult(model, metrics)


def _model_path(run: str | os.PathLike[str]) -> pathlib.Path:
    """A run folder's ``model.pt``, or the file itself."""
    path = pathlib.Path(run)
    return path / "model.pt" if path.is_dir() else path


def load_reconstruction(
    run: str | os.PathLike[str], device: str | torch.device = "cpu"
) -> nn.Module:
    """Rebuild a run's trained map from observations to images.

    Arguments:
        run: A run folder of :func:`fit_reconstruction` (or its ``model.pt``).
        device: Where to put the module.

    Returns:
        The module ``(B, *y_shape) -> (B, *x_shape)``, one forward pass, in eval mode, with the
        file's ``metadata`` (shapes, configuration) as an attribute.

    Raises:
        FileNotFoundError: If the run has no ``model.pt`` (training not finished).
        CheckpointError: If the file is not a reconstruction model or its weights do not fit.
    """
    from cleanprior.runs.checkpoint import CheckpointError, load_checkpoint

    path = _model_path(run)
    payload = load_checkpoint(path, keys=("kind", "model", "state_dict", "metadata"))
    if payload["kind"] != MODEL_KIND:
        raise CheckpointError(
            f"{path} is a {payload['kind']!r} checkpoint, not a reconstruction model"
        )
    spec = payload["model"]
    # the fresh weights are overwritten at once: keep the initialisation off the global generator
    with torch.random.fork_rng(devices=[]):
        try:
            trainable = _build(spec)
        except (KeyError, TypeError, ValueError) as error:
            raise CheckpointError(
                f"{path}: the model's configuration is invalid: {error}"
            ) from None
    try:
        trainable.load_state_dict(payload["state_dict"])
    except RuntimeError as error:
        raise CheckpointError(
            f"{path}: the weights do not fit the saved configuration: {error}"
        ) from None
    model = _wrap(trainable, spec).to(device).eval()
    model.metadata = payload["metadata"]
    return model


@torch.no_grad()
def apply_reconstruction(
    run_or_module: str | os.PathLike[str] | nn.Module, y: Tensor, batch_size: int = 256
) -> Tensor:
    """Reconstruct observations: one forward pass per batch of ``batch_size``, without gradient.

    Arguments:
        run_or_module: A run folder (or its ``model.pt``), or a module from
            :func:`load_reconstruction` / :func:`fit_reconstruction`.
        y: Observations, shape ``(N, *y_shape)``; batches move to the module's device.
        batch_size: Observations per forward pass.

    Returns:
        The reconstructions, shape ``(N, *x_shape)``, on the device of ``y``.

    Raises:
        ValueError: For an empty, complex or non-finite ``y``, observations of another shape
            than the run was trained on, or a non-positive ``batch_size``.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if not isinstance(y, Tensor) or y.ndim < 2 or y.shape[0] == 0:
        got = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
        raise ValueError(f"y must have shape (N, *y_shape) with N >= 1, got {got}")
    if not y.is_floating_point() or not torch.isfinite(y).all():
        raise ValueError("y must hold finite real floating-point values (no NaN or infinity)")
    model = (
        run_or_module
        if isinstance(run_or_module, nn.Module)
        else load_reconstruction(run_or_module)
    )
    expected = getattr(model, "metadata", {}).get("y_shape")
    if expected is not None and list(y.shape[1:]) != list(expected):
        raise ValueError(
            f"the model was trained on observations of shape {tuple(expected)}, got {tuple(y.shape[1:])}"
        )
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else y.device
    model.eval()
    return torch.cat([model(chunk.to(device)).to(y.device) for chunk in y.split(batch_size)])


def _read_observations(path: str | os.PathLike[str]) -> Any:
    """An observation file, or a ``.npz`` holding ``y`` only (then through the identity, noise unknown)."""
    import numpy as np

    from cleanprior.data.files import REQUIRED_KEYS, Observations, load_observations
    from cleanprior.operators.registry import operator

    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no observation file at {path}")
    if path.suffix.lower() != ".npz":
        return load_observations(path)
    with np.load(path) as file:
        keys = set(file.files)
        if "y" not in keys:
            raise ValueError(
                f"{path} holds no observations under the key 'y' (keys: {sorted(keys)})"
            )
        if set(REQUIRED_KEYS) <= keys:
            return load_observations(path)
        y = torch.as_tensor(np.asarray(file["y"]))
        x = torch.as_tensor(np.asarray(file["x"])) if "x" in keys else None
    if not y.is_floating_point():
        y = y.float()
    if y.ndim < 2 or y.shape[0] == 0:
        raise ValueError(
            f"{path}: 'y' must have shape (N, *y_shape) with N >= 1, got {tuple(y.shape)}"
        )
    bad = int((~torch.isfinite(y)).sum())
    if bad:
        raise ValueError(f"{path}: 'y' contains {bad} NaN or infinite values")
    if x is not None:
        x = x.to(y.dtype)
        if x.shape != y.shape:
            raise ValueError(
                f"{path}: 'x' has shape {tuple(x.shape)} but 'y' {tuple(y.shape)}; a file without an "
                "operator holds ground truth of the observations' shape"
            )
        if not torch.isfinite(x).all():
            raise ValueError(f"{path}: 'x' contains NaN or infinite values")
    return Observations(
        y=y, operator=operator("identity"), noise_std=0.0, shape=tuple(y.shape[1:]), x=x
    )


def _read_pairs(path: str | os.PathLike[str]) -> tuple[Tensor, Tensor]:
    """Clean images ``x`` and their observations ``y`` from a ``.npz``."""
    import numpy as np

    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no pairs file at {path}")
    with np.load(path) as file:
        missing = [k for k in ("x", "y") if k not in file.files]
        if missing:
            raise ValueError(
                f"{path} lacks {missing}: a pairs file holds clean images 'x' and observations 'y'"
            )
        x, y = (torch.as_tensor(np.asarray(file[k])) for k in ("x", "y"))
    x = x if x.is_floating_point() else x.float()
    y = y if y.is_floating_point() else y.float()
    for key, value in (("x", x), ("y", y)):
        if not torch.isfinite(value).all():
            raise ValueError(f"{path}: '{key}' contains NaN or infinite values")
    return x, y


def recon_command(
    observations: str,
    output: str,
    method: str = "sud2",
    pairs: str = "",
    prior: str = "",
    noise: str = "gaussian",
    noise_std: float = 0.0,
    config: ReconConfig | None = None,
    device: str | torch.device = "cpu",
    resume: bool = False,
    gain: float = 0.0,
    shape: float = 0.0,
) -> ReconResult:
    """``cleanprior recon``: train a reconstruction network from files into a run folder.

    The explicit arguments override ``config``'s fields of the same name (a noise parameter
    left at 0 keeps ``config``'s value).

    Arguments:
        observations: An observation file, or a ``.npz`` holding ``y`` only (and optionally
            ``x``, the ground truth for the metrics).
        output: The run folder.
        method: One of :data:`METHODS`.
        pairs: A ``.npz`` with clean images ``x`` and their observations ``y`` (``supervised``,
            ``sud``, ``sud2``).
        prior: A run folder of ``cleanprior train`` or ``fit`` (its ``checkpoint.pt``) or a
            checkpoint file: the prior denoiser of ``sud`` and ``sud2``.
        noise: The noise model of ``noise2score`` (``gaussian``, ``poisson``, ``gamma``).
        noise_std: The Gaussian noise level (0: the file's).
        config: The other options.
        device: Where to train (``"auto"``: CUDA when available).
        resume: Continue the run in ``output``.
        gain: The Poisson gain.
        shape: The Gamma shape.

    Returns:
        The trained network and its metrics.
    """
    from cleanprior.runs.checkpoint import load_denoiser

    updates: dict[str, Any] = {"method": method, "noise": noise}
    updates.update(
        {k: v for k, v in (("noise_std", noise_std), ("gain", gain), ("shape", shape)) if v}
    )
    config = dataclasses.replace(config or ReconConfig(), **updates)
    device = resolve_device(device)
    data = _read_observations(observations)
    paired = _read_pairs(pairs) if pairs else None
    denoiser = None
    if prior:
        source = pathlib.Path(prior)
        denoiser = load_denoiser(
            source / "checkpoint.pt" if source.is_dir() else source, device=device
        )
    result = fit_reconstruction(
        data,
        output,
        config=config,
        pairs=paired,
        prior=denoiser,
        resume=resume,
        progress=True,
        description=str(observations),
        device=device,
    )
    shown = ", ".join(
        f"{k} {result.metrics[k]:.4g}"
        for k in ("psnr", "ssim", "psnr_input", "frechet")
        if k in result.metrics
    )
    print(
        f"wrote {output}{f' ({shown})' if shown else ''}; open {pathlib.Path(output) / 'report.html'}"
    )
    return result


def apply_command(
    run: str, observations: str, output: str, batch_size: int = 256, device: str | torch.device = "cpu"
) -> None:
    """``cleanprior apply``: reconstruct every observation of a file into a ``.npz`` under ``x``.

    Arguments:
        run: A run folder of ``cleanprior recon``.
        observations: An observation file or a ``.npz`` holding ``y``.
        output: The ``.npz`` to write (atomically).
        batch_size: Observations per forward pass.
        device: Where to compute (``"auto"``: CUDA when available).
    """
    import numpy as np

    from cleanprior.runs.atomic import atomic_path

    model = load_reconstruction(run, device=resolve_device(device))
    y = _read_observations(observations).y
    began = time.perf_counter()
    x = apply_reconstruction(model, y, batch_size=batch_size)
    seconds = time.perf_counter() - began
    with atomic_path(output) as tmp, open(tmp, "wb") as file:
        np.savez(file, x=x.detach().cpu().numpy())
    print(
        f"wrote {output}: {len(y)} reconstructions in {seconds:.3g} s ({seconds / len(y):.3g} s per image)"
    )
