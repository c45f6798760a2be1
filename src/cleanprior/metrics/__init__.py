"""Metrics: distances between sample sets, image quality, diagnostics."""

from cleanprior.metrics.diagnostics import coverage, posterior_predictive
from cleanprior.metrics.distances import sinkhorn_divergence, sliced_wasserstein
from cleanprior.metrics.frechet import (
    FeatureNetwork,
    feature_network,
    frechet_distance,
    frechet_distance_features,
    frechet_features,
    inception_fid,
)
from cleanprior.metrics.image import psnr, ssim

__all__ = [
    "sinkhorn_divergence",
    "sliced_wasserstein",
    "FeatureNetwork",
    "coverage",
    "feature_network",
    "frechet_distance",
    "frechet_distance_features",
    "frechet_features",
    "inception_fid",
    "posterior_predictive",
    "psnr",
    "ssim",
]
