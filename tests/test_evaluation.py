"""The per-round evaluation: the held-out reconstructions' solver settings reach the sampler."""

from __future__ import annotations

import math

import torch

from cleanprior.data.files import Observations
from cleanprior.learning.em import EMConfig, EvalConfig
from cleanprior.learning.evaluation import evaluate_round
from cleanprior.operators.matrix import Matrix
from cleanprior.reference import GaussianMixture

F64 = torch.float64


def test_more_solver_iterations_fit_an_ill_conditioned_operator(tmp_path):
    """MMPS with the exact denoiser of a correlated Gaussian and an operator of condition number
    1000: one GMRES iteration (the E-step's) leaves the posterior samples far from the data;
    ``EvalConfig.iterations = 8`` solves the Tweedie system and the posterior predictive check
    comes near its expectation 1 (measured: 37.7 with one iteration, 0.75 with eight)."""
    d, g = 8, torch.Generator().manual_seed(0)
    L = torch.randn(d, d, generator=g, dtype=F64)
    cov = L @ L.T / d + 0.05 * torch.eye(d, dtype=F64)
    prior = GaussianMixture(torch.ones(1, dtype=F64), torch.zeros(1, d, dtype=F64), cov[None])
    U, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=F64))
    V, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=F64))
    A = Matrix(U @ torch.diag(torch.logspace(0, -3, d, dtype=F64)) @ V.T)
    x = prior.sample(64, generator=g)
    y = A(x) + 0.01 * torch.randn(64, d, generator=g, dtype=F64)
    heldout = Observations(y=y, operator=A, noise_std=0.01, shape=(d,), x=x)
    config = EMConfig(steps=32, iterations=1, sampler="ddpm", heldout=64)
    ppc = {}
    for iterations in (0, 8):
        evaluation = EvalConfig(prior_samples=16, posterior_samples=2, steps=8, iterations=iterations)
        metrics = evaluate_round(prior, heldout, tmp_path / str(iterations), evaluation, config,
                                 round_index=1, exact=False, seed=0)
        ppc[iterations] = metrics["ppc"]
    assert abs(math.log(ppc[8])) < 0.5 * abs(math.log(ppc[0])), ppc
    assert 0.5 < ppc[8] < 2, ppc
