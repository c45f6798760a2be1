"""What a learning method measures and draws after every round.

A real user has no clean images, so every round first records diagnostics that need none, on
held-out observations the method never trained on:

- ``ppc``: the posterior predictive check :math:`\\|y - A x\\|^2 / (m \\sigma_y^2)` for posterior
  samples :math:`x \\sim q(x \\mid y)` (mean over held-out observations and samples): near 1 the
  prior explains the data at the noise level; far above, it cannot explain them; far below, the
  samples overfit the noise (:func:`cleanprior.metrics.diagnostics.posterior_predictive`);
- ``log_evidence``: for the Gaussian start (round 0), its exact held-out log-evidence per
  observation, the baseline a diffusion prior should beat (its own evidence is intractable).

With ground truth (``x`` in the observation file, or a reference dataset), it adds the PSNR and
SSIM of posterior samples and of their mean (images), or their RMSE (vectors); the Frechet distance
of prior samples to clean images in a classifier's feature space
(:mod:`cleanprior.metrics.frechet`), and, in low dimension (``d <= 16``), the Sinkhorn divergence
of prior samples to clean samples.

Figures, in the round's folder: ``samples.png`` (prior samples; a scatter of the first two
coordinates against the reference for vectors) and ``posterior.png`` (held-out observations:
truth when known, the observation seen through the adjoint, the posterior mean, the pixel-wise
standard deviation, two samples).
"""

from __future__ import annotations

import dataclasses
import pathlib
import time
import warnings
from typing import Any

import torch
from torch import Tensor

__all__ = ["evaluate_round"]

SINKHORN_MAX_DIM = 16
"""Sinkhorn divergences are reported up to this dimension (beyond, a few thousand samples say
little)."""


def _prior_samples(prior: Any, n: int, shape: tuple[int, ...], steps: int, exact: bool, generator: torch.Generator) -> Tensor:
    from cleanprior.diffusion.samplers import sample_prior

    if exact:
        return prior.sample(n, generator=generator).detach().cpu()
    return sample_prior(prior, n, shape=shape, steps=steps, sampler="heun", generator=generator).detach().cpu()


def _scatter(x: Tensor, reference: Tensor | None, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(4, 4))
    if reference is not None:
        axis.scatter(reference[:, 0], reference[:, 1], s=3, alpha=0.4, color="tab:gray", label="clean")
    axis.scatter(x[:, 0], x[:, 1], s=3, alpha=0.6, color="tab:blue", label="prior samples")
    axis.set_xlabel("x[0]")
    axis.set_ylabel("x[1]")
    axis.legend(loc="best", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def evaluate_round(
    prior: Any,
    heldout: Any,
    folder: pathlib.Path,
    evaluation: Any,
    config: Any,
    *,
    round_index: int,
    exact: bool,
    seed: int,
    device: torch.device | None = None,
    shape: tuple[int, ...] | None = None,
) -> dict[str, Any]:
    """Measure a prior and draw its figures.

    Arguments:
        prior: A denoiser, or (``exact``) a prior with exact ``sample`` and ``sample_posterior``
            such as the Gaussian start.
        heldout: Held-out :class:`~cleanprior.data.files.Observations` (``None``: no posterior
            metrics).
        folder: Where the figures go (created).
        evaluation: An :class:`~cleanprior.learning.em.EvalConfig`.
        config: The :class:`~cleanprior.learning.em.EMConfig` whose sampler options are used
            (with ``evaluation.method`` as the posterior method).
        round_index: The round (0 for the start).
        exact: Whether ``prior`` samples exactly (no sampler).
        seed: The run's seed; the same held-out draws are used every round.
        device: Where the prior computes, and so where its samples are drawn (default: the
            held-out observations' device, or the CPU without them).
        shape: The shape of one sample (default: the held-out observations', or, without them,
            the exact prior's).

    Returns:
        The round's metrics (plain floats).
    """
    from cleanprior.learning.em import posterior_batches
    from cleanprior.learning.rounds import round_generator
    from cleanprior.metrics.diagnostics import posterior_predictive
    from cleanprior.runs.report import save_image_grid

    began = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    metrics: dict[str, Any] = {"round": round_index}
    if shape is None:
        shape = tuple(heldout.shape) if heldout is not None else tuple(prior.shape)
    images = len(shape) == 3
    d = int(torch.tensor(shape).prod())

    if device is None:
        device = heldout.y.device if heldout is not None else torch.device("cpu")
    x_prior = _prior_samples(prior, evaluation.prior_samples, shape, evaluation.steps, exact,
                             round_generator(seed, 6, round_index, device=device))
    reference = None
    if evaluation.reference:
        from cleanprior.data.files import load_clean

        # an embedded dataset's test split: images the prior never saw in any form
        reference = load_clean(evaluation.reference, "test")
    elif heldout is not None and heldout.x is not None:
        reference = heldout.x.detach().cpu()
    if images:
        save_image_grid(x_prior, folder / "samples.png")
    elif d >= 2:
        _scatter(x_prior, reference, folder / "samples.png")

    if reference is not None and d <= SINKHORN_MAX_DIM:
        from cleanprior.metrics import sinkhorn_divergence

        metrics["sinkhorn"] = float(sinkhorn_divergence(x_prior.flatten(1), reference.flatten(1)))
    frechet = evaluation.frechet or (evaluation.reference if images and evaluation.reference else "")
    if images and frechet and reference is not None:
        from cleanprior.metrics.frechet import feature_network, frechet_distance_features

        network = feature_network(frechet)
        metrics["frechet"] = float(frechet_distance_features(x_prior, reference, network))
    if images and evaluation.inception and reference is not None:
        from cleanprior.metrics.frechet import inception_fid

        try:
            metrics["fid_inception"] = inception_fid(x_prior, reference)
        except RuntimeError as error:
            warnings.warn(f"no Inception FID this round: {error}", stacklevel=2)

    if heldout is not None and len(heldout) > 0:
        from cleanprior.learning.em import CPU_BATCH_SIZE

        S = evaluation.posterior_samples
        # as many samples per batch as an E-step batch of one sample each; a size chosen on a GPU
        # already counts the samples
        size = config.batch_size or (CPU_BATCH_SIZE if heldout.y.device.type == "cpu" else 0)
        eval_config = dataclasses.replace(config, posterior=evaluation.method, batch_size=max(1, size // S) if size else 0,
                                          iterations=evaluation.iterations or config.iterations)
        x = posterior_batches(prior, heldout, config=eval_config, samples=S, seed_keys=(5,), exact=exact,
                              distribute=False)
        x = x.to(heldout.y.device)
        repeated = heldout.subset(torch.arange(len(heldout)).repeat_interleave(S))
        ppc = posterior_predictive(repeated.y, repeated.operator, x, repeated.noise_std)
        metrics["ppc"] = float(ppc.mean())
        metrics["ppc_median"] = float(ppc.median())
        if exact and hasattr(prior, "log_evidence"):
            # dense m x m covariances: bounded to a few observations (64 images of 784 pixels: ~40 s)
            some = heldout.subset(torch.arange(min(len(heldout), evaluation.evidence_observations)))
            metrics["log_evidence"] = float(prior.log_evidence(some.operator, some.y, some.noise_std).mean())
        x = x.reshape(len(heldout), S, *shape).cpu()
        mean, std = x.mean(1), x.std(1) if S > 1 else torch.zeros_like(x[:, 0])
        truth = heldout.x.detach().cpu() if heldout.x is not None else None
        if truth is not None:
            if images:
                from cleanprior.metrics.image import psnr, ssim

                flat_truth = truth.repeat_interleave(S, 0)
                # the standard 11-pixel window, narrowed (odd) for images smaller than it
                side = min(shape[-2:])
                window = min(11, side if side % 2 else side - 1)
                metrics["psnr_sample"] = float(psnr(x.flatten(0, 1), flat_truth).mean())
                metrics["psnr_mean"] = float(psnr(mean, truth).mean())
                metrics["ssim_sample"] = float(ssim(x.flatten(0, 1), flat_truth, window=window).mean())
                metrics["ssim_mean"] = float(ssim(mean, truth, window=window).mean())
            else:
                metrics["rmse_sample"] = float(((x - truth[:, None]) ** 2).mean().sqrt())
                metrics["rmse_mean"] = float(((mean - truth) ** 2).mean().sqrt())
        if images:
            k = min(evaluation.shown, len(heldout))
            observed = heldout.subset(torch.arange(k))
            seen = observed.operator.adjoint(observed.y).real.detach().cpu()
            if seen.shape[1:] != shape:
                seen = torch.zeros((k, *shape))
            rows = [] if truth is None else [truth[:k]]
            rows += [seen.clamp(-1, 1), mean[:k], 2 * std[:k] / std[:k].max().clamp_min(1e-12) - 1, x[:k, 0]]
            if S > 1:
                rows.append(x[:k, 1])
            save_image_grid(torch.cat(rows), folder / "posterior.png", nrow=k)
    metrics["eval_seconds"] = time.perf_counter() - began
    return metrics
