"""DiffPIR, data consistency, ILVR and MCG: their defining properties, beyond the shared contract."""

import math

import pytest
import torch

from cleanprior import GaussianMixture
from cleanprior.diffusion.samplers import NonFiniteError
from cleanprior.operators import Downsample, FunctionOperator, Mask, Matrix
from cleanprior.posterior import (
    METHOD_TABLE,
    METHODS,
    DataConsistency,
    data_consistency,
    diffpir,
    ilvr,
    mcg,
    sample_posterior,
)


def counting(prior):
    """The prior's denoiser, recording every input it is called on."""
    calls = []

    def denoiser(x, sigma):
        calls.append(x.clone())
        return prior(x, sigma)

    return denoiser, calls


def test_loops_are_registered():
    assert {"diffpir", "dc", "ilvr", "mcg"} <= set(METHODS())
    assert METHOD_TABLE["dc"] is DataConsistency


def test_diffpir_proximal_step_is_the_closed_form():
    """On a one-step grid DiffPIR returns the proximal point; converged CG matches a dense solve."""
    g = torch.Generator().manual_seed(0)
    d = 5
    prior = GaussianMixture.isotropic(torch.randn(3, d, generator=g, dtype=torch.float64), 0.4)
    A = torch.randn(3, d, generator=g, dtype=torch.float64)
    y = torch.randn(4, 3, generator=g, dtype=torch.float64)
    x_t = torch.randn(4, d, generator=g, dtype=torch.float64)
    sigma, noise, lam = 0.7, 0.3, 2.0
    x = diffpir(prior, Matrix(A), y, noise, x_t, [sigma, 0.0], generator=g, lam=lam, iterations=d + 1)
    rho = lam * noise**2 / sigma**2
    rhs = y @ A + rho * prior(x_t, torch.full((4,), sigma, dtype=torch.float64))
    expected = torch.linalg.solve(A.T @ A + rho * torch.eye(d, dtype=torch.float64), rhs.T).T
    assert torch.allclose(x, expected, atol=1e-8)


def test_diffpir_takes_one_noise_level_per_observation():
    prior = GaussianMixture.isotropic(torch.tensor([[0.5, -0.5], [-0.5, 0.5]]), 0.2)
    A, y = Matrix(torch.tensor([[1.0, 0.0]])), torch.full((6, 1), 0.4)
    x_t = 10 * torch.randn(6, 2, generator=torch.Generator().manual_seed(1))
    sigmas = torch.tensor([10.0, 1.0, 0.1, 0.0], dtype=torch.float64)
    run = lambda noise: diffpir(prior, A, y, noise, x_t, sigmas, generator=torch.Generator().manual_seed(2))  # noqa: E731
    assert torch.allclose(run(0.1), run(torch.full((6,), 0.1)))


def test_projection_dc_ends_on_the_measurements():
    prior = GaussianMixture.isotropic(torch.tensor([[1.0, -1.0, 0.5, 0.0], [-1.0, 1.0, 0.0, 0.5]]), 0.3)
    g = torch.Generator().manual_seed(3)
    A = Mask(torch.tensor([[1.0, 0.0, 1.0, 0.0]]))
    y = A(prior.sample(64, g).float())
    x = sample_posterior(prior, A, y, shape=(4,), noise_std=0.01, method="dc", mode="projection", steps=16, generator=g)
    assert torch.equal(A(x), y)


def test_gradient_dc_reduces_the_residual_at_every_step():
    """The quadratic case: with D(x) = x (a flat prior) and eta = 0 the reverse step is the identity,
    so only the data-consistency steps move x and each must shrink ||A x - y||."""
    g = torch.Generator().manual_seed(4)
    A = Matrix(torch.randn(3, 5, generator=g))
    y = torch.randn(8, 3, generator=g)
    residuals = []

    def flat(x, sigma):
        residuals.append((A(x) - y).norm(dim=1))
        return x

    sigmas = torch.linspace(2.0, 0.0, 21, dtype=torch.float64)
    x = data_consistency(flat, A, y, 0.1, torch.randn(8, 5, generator=g), sigmas, generator=g, eta=0.0)
    residuals.append((A(x) - y).norm(dim=1))
    trace = torch.stack(residuals)
    assert (trace[1:] <= trace[:-1] + 1e-5).all()
    assert (trace[-1] < 0.5 * trace[0]).all()
    small = data_consistency(flat, A, y, 0.1, torch.randn(8, 5, generator=g), sigmas, generator=g, eta=0.0, step=1e-3)
    assert ((A(small) - y).norm(dim=1) > trace[-1]).all()  # a tiny step barely moves


def test_gradient_dc_default_step_projects_for_a_mask():
    """The default step 1 / ||A^T A|| is 1 for a binary mask, where a gradient step is the projection."""
    prior = GaussianMixture.isotropic(torch.tensor([[1.0, -1.0, 0.5], [-1.0, 1.0, 0.0]]), 0.3)
    A = Mask(torch.tensor([[0.0, 1.0, 1.0]]))
    y = torch.tensor([[0.0, 0.7, -0.2]]).repeat(16, 1)
    x = sample_posterior(prior, A, y, shape=(3,), noise_std=0.1, method="dc", steps=8, generator=torch.Generator().manual_seed(5))
    assert torch.allclose(A(x), y, atol=1e-6)


def test_ilvr_matches_the_low_frequencies_of_the_observation():
    """Average downsampling on 4x4 images: Phi = A^+ A is the block-mean low-pass filter."""
    g = torch.Generator().manual_seed(6)
    prior = GaussianMixture.isotropic(torch.randn(3, 16, generator=g), 0.2, shape=(1, 4, 4))
    A = Downsample(2)
    y = A(prior.sample(32, g).float().reshape(32, 1, 4, 4))
    x = sample_posterior(prior, A, y, shape=(1, 4, 4), noise_std=0.01, method="ilvr", steps=16, generator=g)
    low_pass = A.pinv(A(x))
    assert torch.allclose(low_pass, A.pinv(y), atol=1e-5)
    assert (x - low_pass).abs().amax() > 1e-2  # the high frequencies come from the prior


def test_mcg_samples_fit_the_measurements_within_the_noise():
    prior = GaussianMixture.isotropic(torch.tensor([[-0.7, -0.7], [0.7, 0.7], [-0.7, 0.7], [0.7, -0.7]]), 0.15)
    A = Matrix(torch.tensor([[1.0, 0.0]]))
    y = torch.full((200, 1), -0.8)
    x = sample_posterior(prior, A, y, shape=(2,), noise_std=0.1, method="mcg", steps=32, generator=torch.Generator().manual_seed(7))
    assert ((A(x) - y).abs() < 0.1).all()
    assert (x[:, 1] > 0).float().mean().sub(0.5).abs() < 0.15  # both modes of the unobserved coordinate


@pytest.mark.parametrize(
    "method, operator, options, match",
    [
        ("dc", "matrix", dict(mode="newton"), "unknown data-consistency mode"),
        ("dc", "weighted", dict(mode="projection"), "pseudo-inverse"),
        ("dc", "matrix", dict(step=-1.0), "step must be positive"),
        ("dc", "nonlinear", dict(), "linear operator"),
        ("ilvr", "weighted", dict(), "pseudo-inverse"),
        ("mcg", "weighted", dict(), "pseudo-inverse"),
        ("mcg", "matrix", dict(zeta=-1.0), "zeta must be positive"),
        ("diffpir", "matrix", dict(lam=0.0), "lam must be positive"),
        ("diffpir", "matrix", dict(zeta=2.0), "zeta must lie"),
        ("diffpir", "matrix", dict(iterations=0), "iterations must be a positive integer"),
        ("diffpir", "nonlinear", dict(), "linear operator"),
    ],
)
def test_bad_options_are_refused_before_sampling(method, operator, options, match):
    prior = GaussianMixture.isotropic(torch.zeros(1, 2), 1.0)
    denoiser, calls = counting(prior)
    A = {
        "matrix": Matrix(torch.tensor([[1.0, 0.0]])),
        "weighted": Mask(torch.tensor([[0.5, 1.0]])),
        "nonlinear": FunctionOperator(lambda x: x.abs()),
    }[operator]
    y = A(torch.ones(3, 2))
    with pytest.raises(ValueError, match=match):
        sample_posterior(denoiser, A, y, shape=(2,), noise_std=0.1, method=method, steps=4, **options)
    assert not calls


def test_eta_is_checked_before_sampling():
    prior = GaussianMixture.isotropic(torch.zeros(1, 2), 1.0)
    denoiser, calls = counting(prior)
    A, y, x_t = Matrix(torch.tensor([[1.0, 0.0]])), torch.zeros(3, 1), torch.zeros(3, 2)
    for loop in (data_consistency, ilvr, mcg):
        with pytest.raises(ValueError, match="eta must lie"):
            loop(denoiser, A, y, 0.1, x_t, [1.0, 0.0], eta=1.5)
    assert not calls


def test_non_finite_steps_name_the_method_and_the_level():
    def broken(x, sigma):
        return x * math.nan

    A, y = Matrix(torch.tensor([[1.0, 0.0]])), torch.zeros(2, 1)
    for method in ("diffpir", "dc", "ilvr"):
        with pytest.raises(FloatingPointError, match=rf"{method} produced non-finite values stepping from sigma=80"):
            sample_posterior(broken, A, y, shape=(2,), noise_std=0.1, method=method, steps=4)
    with pytest.raises(NonFiniteError, match="mcg"):
        sample_posterior(broken, A, y, shape=(2,), noise_std=0.1, method="mcg", steps=4)


def test_progress_bar_and_reproducibility():
    prior = GaussianMixture.isotropic(torch.tensor([[0.5, -0.5], [-0.5, 0.5]]), 0.2)
    A, y = Matrix(torch.tensor([[1.0, 0.0]])), torch.full((4, 1), 0.4)
    for method in ("diffpir", "dc", "ilvr", "mcg"):
        runs = [sample_posterior(prior, A, y, shape=(2,), noise_std=0.1, method=method, steps=4, progress=True,
                                 generator=torch.Generator().manual_seed(8)) for _ in range(2)]
        assert torch.equal(*runs)
