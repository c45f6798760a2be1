"""The one training loop (:mod:`cleanprior.training.loop`) that every network of the package goes through."""

from cleanprior.training.loop import Trained, Update, ema_update, optimize, resume_state

__all__ = ["Trained", "Update", "ema_update", "optimize", "resume_state"]
