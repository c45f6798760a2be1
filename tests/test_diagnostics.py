import math

import pytest
import torch

from cleanprior.metrics import coverage, posterior_predictive
from cleanprior.operators import Fourier, Mask, Matrix, corrupt, random_mask


def _gaussian_problem(B: int, m: int, d: int, sigma: float, seed: int):
    """x ~ N(0, I_d), y = A x + sigma n, and the exact posterior N(mu', Sigma') of every y.

    Sigma' = (I + A^T A / sigma^2)^-1 and mu' = Sigma' A^T y / sigma^2, in float64.
    """
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(m, d, generator=g, dtype=torch.float64) / math.sqrt(d)
    x = torch.randn(B, d, generator=g, dtype=torch.float64)
    y = x @ A.T + sigma * torch.randn(B, m, generator=g, dtype=torch.float64)
    cov = torch.linalg.inv(torch.eye(d, dtype=torch.float64) + A.T @ A / sigma**2)
    mean = y @ A @ cov / sigma**2
    root = torch.linalg.cholesky(cov)
    return g, A, x, y, mean, root, cov


def _within_monte_carlo_error(values: torch.Tensor, expected: float | torch.Tensor) -> None:
    """The mean of independent values equals ``expected`` to 4 standard errors."""
    error = (values - expected).mean().abs()
    assert error < 4 * values.std() / math.sqrt(values.shape[0]), (values.mean(), expected)


def test_posterior_predictive_of_exact_posterior_samples_matches_its_expectation():
    r"""For x ~ p(x | y), E[|y - A x|^2 | y] = |y - A mu'|^2 + tr(A Sigma' A^T).

    With A A^T = sum_i lambda_i v_i v_i^T (prior covariance I) and c_i = v_i^T y, the two terms
    are sum_i sigma^4 c_i^2 / (sigma^2 + lambda_i)^2 and sum_i sigma^2 lambda_i / (sigma^2 + lambda_i);
    as E c_i^2 = lambda_i + sigma^2 over y, their mean is m sigma^2: the check is 1 on average.
    A prior sample ignores y: E|y - A x|^2 = tr(A A^T + sigma^2 I) + tr(A A^T), i.e.
    1 + 2 |A|_F^2 / (m sigma^2). A least-squares fit of m < d unknowns leaves no residual: 0.
    """
    B, m, d, sigma = 4000, 5, 8, 0.3
    g, A, _, y, mean, root, cov = _gaussian_problem(B, m, d, sigma, seed=0)
    samples = mean + torch.randn(B, d, generator=g, dtype=torch.float64) @ root.T
    check = posterior_predictive(y, Matrix(A), samples, sigma)
    assert check.shape == (B,) and check.dtype == torch.float64

    lam, V = torch.linalg.eigh(A @ A.T)
    c = y @ V
    conditional = ((sigma**4 * c**2 / (sigma**2 + lam) ** 2).sum(1) + (sigma**2 * lam / (sigma**2 + lam)).sum()) / (m * sigma**2)
    # The eigen-terms are |y - A mu'|^2 + tr(A Sigma' A^T), computed directly.
    direct = ((y - mean @ A.T).square().sum(1) + torch.trace(A @ cov @ A.T)) / (m * sigma**2)
    torch.testing.assert_close(conditional, direct, rtol=1e-10, atol=0)
    _within_monte_carlo_error(check, conditional)
    _within_monte_carlo_error(conditional, 1.0)
    _within_monte_carlo_error(check, 1.0)

    prior = torch.randn(B, d, generator=g, dtype=torch.float64)
    expected = 1 + 2 * A.square().sum() / (m * sigma**2)
    prior_check = posterior_predictive(y, Matrix(A), prior, sigma)
    _within_monte_carlo_error(prior_check, expected)
    assert prior_check.mean() > 5

    fit = Matrix(A).pinv(y)
    assert posterior_predictive(y, Matrix(A), fit, sigma).max() < 1e-20


def test_posterior_predictive_counts_complex_and_masked_measurements_like_the_noise():
    """At the truth the residual is the noise itself, so the check averages exactly 1.

    k-space noise is circular, E|n_i|^2 = sigma^2 per complex entry; masked pixels carry noise too.
    """
    g = torch.Generator().manual_seed(1)
    x = torch.rand(400, 1, 8, 8, generator=g, dtype=torch.float64) * 2 - 1
    fourier = Fourier((torch.rand(400, 8, 8, generator=g) > 0.5).double(), view="real")
    mask = Mask(random_mask((1, 8, 8), 0.5, batch=400, generator=g).double())
    for operator, sigma, is_complex in ((fourier, 0.2, True), (mask, 0.1, False)):
        y, A = corrupt(x, operator, sigma, generator=g)
        assert y.is_complex() == is_complex
        _within_monte_carlo_error(posterior_predictive(y, A, x, sigma), 1.0)


def test_posterior_predictive_takes_noise_levels_per_observation_and_per_entry():
    g = torch.Generator().manual_seed(2)
    A = torch.randn(3, 4, generator=g, dtype=torch.float64)
    x = torch.randn(5, 4, generator=g, dtype=torch.float64)
    y = x @ A.T + torch.randn(5, 3, generator=g, dtype=torch.float64)
    levels = torch.tensor([0.5, 1.0, 2.0, 0.25, 1.5], dtype=torch.float64)
    residual = (y - x @ A.T).square().sum(1)
    torch.testing.assert_close(posterior_predictive(y, Matrix(A), x, levels), residual / (3 * levels**2), rtol=1e-12, atol=0)
    per_entry = levels[:, None].expand(5, 3)
    torch.testing.assert_close(posterior_predictive(y, lambda v: v @ A.T, x, per_entry), residual / (3 * levels**2), rtol=1e-12, atol=0)


def test_posterior_predictive_refuses_bad_inputs():
    A = Matrix(torch.eye(3))
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="3 samples for 2 observations"):
        posterior_predictive(torch.zeros(2, 3), A, torch.zeros(3, 3), 1.0)
    with pytest.raises(ValueError, match="noise_std must be positive"):
        posterior_predictive(torch.zeros(2, 3), A, x, 0.0)
    with pytest.raises(ValueError, match="noise_std of shape"):
        posterior_predictive(torch.zeros(2, 3), A, x, torch.ones(3))
    with pytest.raises(ValueError, match="y contains NaN"):
        posterior_predictive(torch.full((2, 3), float("nan")), A, x, 1.0)
    with pytest.raises(ValueError, match=r"A\(x\) has shape"):
        posterior_predictive(torch.zeros(2, 4), lambda v: v, x, 1.0)


def test_coverage_of_exact_posterior_samples_is_the_nominal_level():
    """Given y, the truth is one more draw of p(x | y): with S = 39 samples the quantile ranks
    p (S + 1) are integers for p = 0.05, 0.25, 0.75, 0.95, so the expected coverage is exactly
    the level. Samples shrunk halfway to the posterior mean cover about 2 Phi(z_l / 2) - 1 instead."""
    B, m, d, sigma, S = 1500, 4, 8, 0.3, 39
    g, _, x, _, mean, root, _ = _gaussian_problem(B, m, d, sigma, seed=3)
    samples = mean[:, None] + torch.randn(B, S, d, generator=g, dtype=torch.float64) @ root.T
    result = coverage(samples, x)
    assert set(result) == {0.5, 0.9}
    for level, fraction in result.items():
        assert fraction.shape == (B,)
        _within_monte_carlo_error(fraction, level)

    narrow = mean[:, None] + 0.5 * (samples - mean[:, None])
    for level, fraction in coverage(narrow, x, levels=(0.5, 0.9)).items():
        z = math.sqrt(2) * torch.special.erfinv(torch.tensor(level, dtype=torch.float64))
        asymptotic = torch.erf(z / 2 / math.sqrt(2)).item()
        assert fraction.mean() < level - 0.2
        assert abs(fraction.mean().item() - asymptotic) < 0.05


def test_coverage_intervals_and_errors():
    # S = 3, level 0.5: quantile ranks 0.25 * 4 = 1 and 0.75 * 4 = 3, the minimum and the maximum.
    samples = torch.tensor([[[0.0, 2.0], [1.0, 5.0], [3.0, 4.0]]])
    truth = torch.tensor([[3.0, 5.5]])
    assert coverage(samples, truth, levels=(0.5,))[0.5].tolist() == [0.5]
    assert coverage(samples, torch.tensor([[0.0, 2.0]]), levels=(0.5,))[0.5].tolist() == [1.0]
    with pytest.raises(ValueError, match="at least 19 samples"):
        coverage(torch.zeros(2, 18, 3), torch.zeros(2, 3), levels=(0.9,))
    with pytest.raises(ValueError, match=r"levels must lie in \(0, 1\)"):
        coverage(torch.zeros(2, 40, 3), torch.zeros(2, 3), levels=(1.0,))
    with pytest.raises(ValueError, match="truth must have shape"):
        coverage(torch.zeros(2, 40, 3), torch.zeros(2, 4))
