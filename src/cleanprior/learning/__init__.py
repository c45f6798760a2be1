"""Learning clean priors from corrupted observations (``fit``) and reconstruction networks."""

from cleanprior.learning.fit import LEARNING_METHODS, FitResult, fit
from cleanprior.learning.gaussian import DENSE_LIMIT, GaussianPrior, fit_gaussian

__all__ = [
    "DENSE_LIMIT",
    "FitResult",
    "GaussianPrior",
    "LEARNING_METHODS",
    "fit",
    "fit_gaussian",
]
