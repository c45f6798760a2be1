"""Posterior sampling: guidance rules, methods as sampler steps, and the Krylov solvers they use."""

from cleanprior.posterior.api import (
    METHOD_TABLE,
    METHODS,
    check_observation,
    method_options,
    sample_posterior,
)
from cleanprior.posterior.decoupled import DAPS, PnPDM, daps, pnpdm
from cleanprior.posterior.guidance import (
    DPS,
    GUIDANCE,
    MMPS,
    SDA,
    TMPD,
    PiGDM,
    PosteriorDenoiser,
    posterior_denoiser,
)
from cleanprior.posterior.linalg import SOLVERS, Solver, SolveResult, bicgstab, cg, gmres, solve
from cleanprior.posterior.loops import (
    ILVR,
    MCG,
    DataConsistency,
    DiffPIR,
    data_consistency,
    diffpir,
    ilvr,
    mcg,
)
from cleanprior.posterior.smc import TDS, TWISTS, effective_sample_size, systematic_resample, tds
from cleanprior.posterior.steps import Conditioned, Observation, PosteriorStep

__all__ = [
    "DAPS",
    "DPS",
    "GUIDANCE",
    "ILVR",
    "MCG",
    "METHODS",
    "METHOD_TABLE",
    "MMPS",
    "SDA",
    "SOLVERS",
    "TDS",
    "TMPD",
    "TWISTS",
    "Conditioned",
    "DataConsistency",
    "DiffPIR",
    "Observation",
    "PiGDM",
    "PnPDM",
    "PosteriorDenoiser",
    "PosteriorStep",
    "SolveResult",
    "Solver",
    "bicgstab",
    "cg",
    "check_observation",
    "daps",
    "data_consistency",
    "diffpir",
    "effective_sample_size",
    "gmres",
    "ilvr",
    "mcg",
    "method_options",
    "pnpdm",
    "posterior_denoiser",
    "sample_posterior",
    "solve",
    "systematic_resample",
    "tds",
]
