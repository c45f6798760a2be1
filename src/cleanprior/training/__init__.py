"""The one training loop (:mod:`cleanprior.training.loop`) that every network of the package goes through."""

from cleanprior.training.loop import Trained, Update, optimize

__all__ = ["Trained", "Update", "optimize"]
