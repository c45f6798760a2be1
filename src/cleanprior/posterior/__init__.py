"""Posterior sampling: guidance rules, methods as sampler steps, and the Krylov solvers they use."""

from cleanprior.posterior.api import METHOD_TABLE, METHODS, check_observation, method_options, sample_posterior
from cleanprior.posterior.guidance import DPS, GUIDANCE, MMPS, SDA, TMPD, PiGDM, PosteriorDenoiser, posterior_denoiser
from cleanprior.posterior.linalg import SOLVERS, SolveResult, Solver, bicgstab, cg, gmres, solve
from cleanprior.posterior.loops import MCG, DataConsistency, DiffPIR, ILVR, data_consistency, diffpir, ilvr, mcg
from cleanprior.posterior.smc import TDS, TWISTS, effective_sample_size, systematic_resample, tds
from cleanprior.posterior.decoupled import DAPS, PnPDM, daps, pnpdm
from cleanprior.posterior.steps import Conditioned, Observation, PosteriorStep

__all__ = [
    "DPS",
    "GUIDANCE",
    "METHOD_TABLE",
    "METHODS",
    "MMPS",
    "SDA",
    "SOLVERS",
    "TMPD",
    "PiGDM",
    "PosteriorDenoiser",
    "SolveResult",
    "Solver",
    "bicgstab",
    "cg",
    "check_observation",
    "method_options",
    "gmres",
    "posterior_denoiser",
    "sample_posterior",
    "solve",
    "Conditioned",
    "DataConsistency",
    "DiffPIR",
    "ILVR",
    "MCG",
    "Observation",
    "PosteriorStep",
    "TDS",
    "data_consistency",
    "diffpir",
    "ilvr",
    "mcg",
    "TWISTS",
    "effective_sample_size",
    "systematic_resample",
    "tds",
    "DAPS",
    "PnPDM",
    "daps",
    "pnpdm",
]
