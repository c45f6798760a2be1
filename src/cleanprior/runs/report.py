"""Figures for run reports.

Pillow is imported inside the functions that write files, so importing this module costs no
more than importing torch and NumPy.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from cleanprior.runs.atomic import atomic_path

__all__ = ["image_grid", "metric_curves", "save_image_grid", "write_report"]

# Separators and unused cells are white so that tiles with dark backgrounds (MNIST, faces)
# stay visibly apart.
_PAD_VALUE = 255


def image_grid(
    x: Tensor,
    *,
    nrow: int | None = None,
    value_range: tuple[float, float] = (-1.0, 1.0),
    padding: int = 1,
) -> np.ndarray:
    """Tile a batch of images into one 8-bit image.

    Images are laid out row by row, ``nrow`` per row, with ``padding`` white pixels around
    every tile (the outer border included); cells after the last image stay white. Values
    are clamped to ``value_range`` and mapped linearly to ``0..255``, rounding to nearest,
    so ``value_range[0]`` becomes 0 and ``value_range[1]`` becomes 255.

    Args:
        x: Images, shape ``(B, C, H, W)`` with ``C`` 1 (grayscale) or 3 (RGB), ``B >= 1``,
            any floating or integer dtype, any device.
        nrow: Images per row; defaults to ``ceil(sqrt(B))``.
        value_range: ``(low, high)`` of the input scale, ``low < high``.
        padding: Pixels between tiles and around the grid, ``>= 0``.

    Returns:
        The grid, shape ``(rows * (H + padding) + padding, nrow * (W + padding) + padding,
        C)`` with ``rows = ceil(B / nrow)``, dtype uint8.

    Raises:
        ValueError: If ``x`` is not 4-D, has a channel count other than 1 or 3, is empty,
            or holds NaN or infinite values, or if ``nrow``, ``value_range`` or ``padding``
            is invalid.
    """
    if x.ndim != 4:
        raise ValueError(f"expected 4-D images (B, C, H, W), got shape {tuple(x.shape)}")
    batch, channels, height, width = x.shape
    if channels not in (1, 3):
        raise ValueError(f"expected 1 or 3 channels, got {channels} (shape {tuple(x.shape)})")
    if batch == 0 or height == 0 or width == 0:
        raise ValueError(f"cannot make a grid of an empty batch (shape {tuple(x.shape)})")
    x = x.detach().to("cpu", torch.float64)
    if not torch.isfinite(x).all():
        raise ValueError("images contain NaN or infinite values")
    low, high = value_range
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise ValueError(f"value_range must be finite with low < high, got {value_range}")
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    ncol = math.ceil(math.sqrt(batch)) if nrow is None else nrow
    if ncol < 1:
        raise ValueError(f"nrow must be >= 1, got {nrow}")
    rows = math.ceil(batch / ncol)

    # Adding 0.5 before truncation rounds half up, so the midpoint of the range lands on 128.
    scaled = (x.clamp(low, high) - low) / (high - low) * 255.0 + 0.5
    tiles = scaled.to(torch.uint8).permute(0, 2, 3, 1).numpy()
    grid = np.full(
        (rows * (height + padding) + padding, ncol * (width + padding) + padding, channels),
        _PAD_VALUE,
        dtype=np.uint8,
    )
    for i, tile in enumerate(tiles):
        top = padding + (i // ncol) * (height + padding)
        left = padding + (i % ncol) * (width + padding)
        grid[top : top + height, left : left + width] = tile
    return grid


def save_image_grid(
    x: Tensor,
    path: str | os.PathLike[str],
    *,
    nrow: int | None = None,
    value_range: tuple[float, float] = (-1.0, 1.0),
    padding: int = 1,
) -> Path:
    """Write a batch of images as one PNG grid, atomically.

    The grid is built and checked before anything touches the disk, then written to a
    temporary file in the destination folder and moved over ``path``, so a reader never
    sees a half-written PNG and a failure leaves an existing file as it was.

    Args:
        x: Images, shape ``(B, C, H, W)`` with ``C`` 1 or 3; see :func:`image_grid`.
        path: Destination PNG; missing parent folders are created.
        nrow: Images per row; defaults to ``ceil(sqrt(B))``.
        value_range: ``(low, high)`` of the input scale, mapped to 0 and 255.
        padding: Pixels between tiles and around the grid.

    Returns:
        ``path`` as a :class:`pathlib.Path`.

    Raises:
        ValueError: As :func:`image_grid`, before any file is created.
    """
    from PIL import Image

    grid = image_grid(x, nrow=nrow, value_range=value_range, padding=padding)
    image = Image.fromarray(grid[..., 0] if grid.shape[2] == 1 else grid)

    path = Path(path)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return path


METRIC_LABELS = {
    "ppc": "posterior predictive ||y - Ax||^2 / (m sigma^2) (ideal 1)",
    "ppc_median": "posterior predictive, median",
    "log_evidence": "held-out log-evidence (Gaussian start)",
    "psnr_sample": "PSNR of a posterior sample (dB)",
    "psnr_mean": "PSNR of the posterior mean (dB)",
    "ssim_sample": "SSIM of a posterior sample",
    "ssim_mean": "SSIM of the posterior mean",
    "rmse_sample": "RMSE of a posterior sample",
    "rmse_mean": "RMSE of the posterior mean",
    "frechet": "Frechet distance of prior samples (classifier features)",
    "fid_inception": "Inception FID of prior samples",
    "sinkhorn": "Sinkhorn divergence of prior samples to clean data",
    "amortized_psnr": "PSNR of the flow's one-pass posterior mean (FlowDiff, dB)",
    "amortized_ssim": "SSIM of the flow's one-pass posterior mean (FlowDiff)",
    "amortized_rmse": "RMSE of the flow's one-pass posterior mean (FlowDiff)",
    "dps_zeta": "DPS step size chosen this round (EMDiffusion)",
    "loss": "training loss (last 50 steps)",
    "estep_seconds": "E-step seconds",
    "mstep_seconds": "M-step seconds",
    "round_seconds": "seconds of the round's learning",
    "start_seconds": "seconds of the method's start (round 0)",
    "eval_seconds": "evaluation seconds",
}
"""What each recorded metric is, for the report's table and plots."""

_CURVES = ("ppc", "psnr_mean", "ssim_mean", "rmse_mean", "amortized_psnr", "frechet", "fid_inception", "sinkhorn",
           "dps_zeta", "loss")


def metric_curves(metrics: list[dict[str, float]], path: str | os.PathLike[str]) -> Path | None:
    """Plot each metric against the round, one panel per metric, into a PNG (atomically).

    Round 0 (the start, e.g. the Gaussian fit) is drawn as a dashed horizontal line so that every
    later round reads against it.

    Args:
        metrics: One dict per round with a ``round`` key and float values.
        path: Destination PNG.

    Returns:
        ``path``, or ``None`` when no metric has a value (nothing is written).
    """
    names = [n for n in _CURVES if any(n in row for row in metrics)]
    if not names:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    columns = min(3, len(names))
    rows = math.ceil(len(names) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4 * columns, 3 * rows), squeeze=False)
    for axis, name in zip(axes.flat, names):
        points = [(row["round"], row[name]) for row in metrics if name in row and row["round"] > 0]
        start = [row[name] for row in metrics if name in row and row["round"] == 0]
        if points:
            axis.plot(*zip(*points), marker="o", color="tab:blue", label="rounds")
        if start:
            axis.axhline(start[0], linestyle="--", color="tab:gray", label="start (round 0)")
        axis.set_title(METRIC_LABELS.get(name, name), fontsize=8)
        axis.set_xlabel("round")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.legend(fontsize=7)
    for axis in list(axes.flat)[len(names):]:
        axis.axis("off")
    figure.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=90)
    plt.close(figure)
    return path


def write_report(
    run: str | os.PathLike[str],
    metrics: list[dict[str, float]],
    *,
    description: str = "",
    title: str = "",
    start_label: str = "Gaussian start",
) -> Path:
    """Write ``RUN/report.html``: a metrics table, metric curves and every round's figures.

    The page uses relative links to the PNGs in the run folder, so it opens from disk and moves
    with the folder. Written atomically.

    Args:
        run: The run folder.
        metrics: One dict per round (``round`` 0 is the start).
        description: What the data are.
        title: The page's title (default: the run folder's name).
        start_label: What round 0 is (the method's start).

    Returns:
        The report's path.
    """
    import html

    run = Path(run)
    title = title or f"cleanprior run {run.resolve().name}"
    curves = metric_curves(metrics, run / "metrics.png")
    names = [n for n in METRIC_LABELS if any(n in row for row in metrics)]
    head = "".join(f"<th title='{html.escape(METRIC_LABELS[n])}'>{html.escape(n)}</th>" for n in names)

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        return "" if value is None else html.escape(str(value))

    body = "".join(
        "<tr><td>" + (start_label if row["round"] == 0 else str(row["round"])) + "</td>"
        + "".join(f"<td>{cell(row.get(n))}</td>" for n in names) + "</tr>"
        for row in metrics
    )
    legend = "".join(f"<li><b>{html.escape(n)}</b>: {html.escape(METRIC_LABELS[n])}</li>" for n in names)
    figures = []
    for row in metrics:
        folder = f"rounds/{row['round']:02d}"
        label = start_label if row["round"] == 0 else f"round {row['round']}"
        images = "".join(
            f"<figure><img src='{folder}/{name}.png'><figcaption>{caption}</figcaption></figure>"
            for name, caption in (("samples", "prior samples"),
                                  ("posterior", "held-out: truth, observed, posterior mean, std, samples"))
            if (run / folder / f"{name}.png").exists()
        )
        if images:
            figures.append(f"<h3>{label}</h3><div class='row'>{images}</div>")
    page = f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:70em}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}} img{{image-rendering:pixelated;max-width:100%}} figure img{{width:30em}}
.row{{display:flex;gap:2em;flex-wrap:wrap;align-items:flex-start}} figure{{margin:0}}</style></head>
<body><h1>{html.escape(title)}</h1><p>{html.escape(description)}</p>
<h2>Metrics by round</h2><table><tr><th>round</th>{head}</tr>{body}</table><ul>{legend}</ul>
{"<img src='metrics.png'>" if curves else ""}
<h2>Figures</h2>{"".join(figures)}
</body></html>
"""
    path = run / "report.html"
    with atomic_path(path) as tmp:
        tmp.write_text(page)
    return path
