"""Learning clean priors from corrupted observations."""

from cleanprior.learning.gaussian import DENSE_LIMIT, GaussianPrior, fit_gaussian

__all__ = [
    "DENSE_LIMIT",
    "GaussianPrior",
    "fit_gaussian",
]
