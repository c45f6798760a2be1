import math

import pytest
import torch
from torch.distributions import MultivariateNormal

from cleanprior.diffusion.denoiser import Denoiser
from cleanprior.learning import GaussianPrior, fit_gaussian
from cleanprior.operators.base import as_operator
from cleanprior.operators.masks import Mask, random_mask
from cleanprior.operators.matrix import Matrix, random_projection
from cleanprior.operators.mri import Fourier
from cleanprior.operators.registry import repeat_items
from cleanprior.reference import GaussianMixture

F64 = torch.float64


def spectral_covariance(d, generator, eigvals):
    """Q diag(eigvals) Q^T with a random rotation Q."""
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=generator, dtype=F64))
    return Q @ torch.diag(torch.as_tensor(eigvals, dtype=F64)) @ Q.T


def dense_prior(shape=(2, 3), seed=0, eigvals=None):
    g = torch.Generator().manual_seed(seed)
    d = math.prod(shape)
    eigvals = torch.linspace(0.3, 1.5, d) if eigvals is None else eigvals
    mean = torch.randn(d, generator=g, dtype=F64)
    return GaussianPrior(mean, spectral_covariance(d, g, eigvals), shape=shape)


def low_rank_prior(shape=(1, 2, 3), rank=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    d = math.prod(shape)
    mean = torch.randn(d, generator=g, dtype=F64)
    factor = 0.7 * torch.randn(d, rank, generator=g, dtype=F64)
    diagonal = 0.05 + 0.1 * torch.rand(d, generator=g, dtype=F64)
    return GaussianPrior(mean, factor=factor, diagonal=diagonal, shape=shape)


def whitened_errors(samples, mean, covariance):
    """n times the squared Mahalanobis error of the sample mean (chi-square with d degrees of
    freedom: mean d, standard deviation sqrt(2d)), and ||C^-1/2 S C^-1/2 - I||_F (its square
    has mean (d^2 + d) / n)."""
    n = samples.shape[0]
    L = torch.linalg.cholesky(covariance)
    white = torch.linalg.solve_triangular(L, (samples - mean).T, upper=False).T
    centred = white - white.mean(0)
    return n * white.mean(0).square().sum(), torch.linalg.norm(
        centred.T @ centred / n - torch.eye(mean.shape[0], dtype=F64)
    )


def test_dense_em_recovers_gaussian_from_projections():
    """EM on random 2-D projections of a 5-D Gaussian finds it to within Monte-Carlo error.

    Each observation carries m(m+1)/2 = 3 of the d(d+1)/2 = 15 second moments, so the data hold
    about n = N m(m+1) / (d(d+1)) = 800 full samples' worth of covariance; a covariance estimate
    from n full samples has E||S - Sigma||_F^2 = (tr(Sigma)^2 + ||Sigma||_F^2) / n. The mean sees
    N m / d = 1600 samples' worth: its Mahalanobis error is about sqrt(d / 1600).
    """
    g = torch.Generator().manual_seed(0)
    d, N, m, noise = 5, 4000, 2, 0.05
    truth = GaussianPrior(
        torch.randn(d, generator=g, dtype=F64), spectral_covariance(d, g, torch.linspace(0.5, 2.0, d))
    )
    A = Matrix(random_projection(m, d, batch=N, generator=g, dtype=F64))
    y = A(truth.sample(N, g)) + noise * torch.randn(N, m, generator=g, dtype=F64)

    history = []
    fit = fit_gaussian(y, A, noise, (d,), iterations=60, history=history)

    Sigma = truth.covariance
    n_cov = N * m * (m + 1) / (d * (d + 1))
    expected_cov = math.sqrt(
        (torch.trace(Sigma) ** 2 + Sigma.square().sum()) / (n_cov * Sigma.square().sum())
    )
    assert torch.linalg.norm(fit.covariance - Sigma) / torch.linalg.norm(Sigma) < 2 * expected_cov
    L = torch.linalg.cholesky(Sigma)
    mean_error = torch.linalg.solve_triangular(L, (fit.mean - truth.mean)[:, None], upper=False).norm()
    assert mean_error < 2.5 * math.sqrt(d / (N * m / d))

    history = torch.tensor(history, dtype=F64)
    assert len(history) == 61
    assert (history.diff() >= -1e-9 * history[1:].abs()).all()
    # the maximum-likelihood fit explains its own data at least as well as the truth does
    assert history[-1] >= truth.log_evidence(A, y, noise).mean() - 1e-9


@pytest.mark.parametrize("kind", ["dense", "singular", "low-rank"])
def test_denoiser_matches_one_component_mixture(kind, device):
    prior = {
        "dense": lambda: dense_prior(),
        "singular": lambda: dense_prior(eigvals=[0.0, 0.0, 0.2, 0.5, 1.0, 2.0]),
        "low-rank": lambda: low_rank_prior(shape=(2, 3)),
    }[kind]().to(device)
    mixture = GaussianMixture(
        torch.ones(1, dtype=F64), prior.mean[None].cpu(), prior.covariance_matrix()[None].cpu(), shape=(2, 3)
    )
    g = torch.Generator().manual_seed(1)
    sigma = torch.tensor([0.01, 0.1, 1.0, 10.0], dtype=F64)
    x_t = (
        prior.mean.cpu().reshape(2, 3) + sigma[:, None, None] * torch.randn(4, 2, 3, generator=g, dtype=F64)
    ).to(device)
    expected = mixture(x_t.cpu(), sigma).to(device)
    torch.testing.assert_close(prior.denoiser(x_t, sigma.to(device)), expected, atol=1e-10, rtol=0)
    torch.testing.assert_close(prior(x_t, 0.3), mixture(x_t.cpu(), 0.3).to(device), atol=1e-10, rtol=0)
    torch.testing.assert_close(
        prior(x_t.float(), sigma.float().to(device)), expected.float(), atol=1e-5, rtol=1e-5
    )
    assert isinstance(prior, Denoiser)

    # the Jacobian is Sigma (Sigma + s^2 I)^-1 (Tweedie's second order: Cov[x | x_t] = s^2 J)
    s = 0.4
    J = torch.autograd.functional.jacobian(
        lambda v: prior(v.reshape(1, 2, 3), s).reshape(6), x_t[0].reshape(6)
    )
    Sigma = prior.covariance_matrix()
    torch.testing.assert_close(
        J, Sigma @ torch.linalg.inv(Sigma + s**2 * torch.eye(6, dtype=F64, device=device)), atol=1e-10, rtol=0
    )


@pytest.mark.parametrize("kind", ["dense", "low-rank"])
def test_sample_and_log_prob(kind):
    """Samples have the prior's moments (d = 6, n = 20000: five standard deviations of the
    chi-square, twice the expected covariance error); log_prob is the normal density."""
    prior = dense_prior() if kind == "dense" else low_rank_prior()
    g = torch.Generator().manual_seed(2)
    n = 20000
    x = prior.sample(n, g)
    assert x.shape == (n, *prior.shape) and x.dtype == F64
    mean_error, cov_error = whitened_errors(x.reshape(n, -1), prior.mean, prior.covariance_matrix())
    assert mean_error < 6 + 5 * math.sqrt(12) and cov_error < 2 * math.sqrt(42 / n)
    reference = MultivariateNormal(prior.mean, prior.covariance_matrix())
    torch.testing.assert_close(
        prior.log_prob(x[:50]), reference.log_prob(x[:50].reshape(50, -1)), atol=1e-10, rtol=0
    )


def test_log_prob_of_singular_covariance_raises():
    with pytest.raises(ValueError, match="non-singular"):
        dense_prior(eigvals=[0.0, 0.1, 0.2, 0.5, 1.0, 2.0]).log_prob(torch.zeros(1, 2, 3, dtype=F64))


def observations(prior, kind, batch, noise, seed=3):
    """A batch of observations of the prior: per-item random matrices, masks or Fourier samples."""
    g = torch.Generator().manual_seed(seed)
    shape, d = prior.shape, prior.features
    if kind == "matrix":
        A = Matrix(random_projection(3, d, batch=batch, generator=g, dtype=F64), x_shape=shape)
    elif kind == "mask":
        A = Mask(random_mask(shape, 0.5, batch=batch, generator=g).double())
    else:
        A = Fourier(torch.ones(1, *shape[1:], dtype=F64), view="real")
    x = prior.sample(batch, g)
    clean = A(x)
    y = clean + noise * torch.randn(clean.shape, generator=g, dtype=clean.dtype)
    return A, y


@pytest.mark.parametrize(("kind", "method"), [("dense", "dense"), ("low-rank", "cg")])
def test_posterior_samples_match_exact_posterior(kind, method):
    """Two observations, each repeated K = 3000 times: the sample moments of each posterior match
    posterior(...) (d = 6: five standard deviations of the chi-square, twice the expected
    covariance error sqrt((d^2 + d) / K) = 0.12), which itself matches the information form."""
    prior = dense_prior() if kind == "dense" else low_rank_prior()
    A, y = observations(prior, "matrix" if kind == "dense" else "mask", 2, 0.1)
    means, covariances = prior.posterior(A, y, 0.1)

    matrices = torch.stack(
        [A.A[i] if kind == "dense" else torch.diag(A.mask[i].reshape(-1)) for i in range(2)]
    )
    precision = torch.linalg.inv(prior.covariance_matrix())[None] + matrices.mT @ matrices / 0.01
    information = torch.linalg.solve(
        precision,
        (torch.linalg.inv(prior.covariance_matrix()) @ prior.mean)[None]
        + (matrices.mT @ y.reshape(2, -1, 1))[..., 0] / 0.01,
    )
    torch.testing.assert_close(covariances, torch.linalg.inv(precision), atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(means.reshape(2, -1), information, atol=1e-10, rtol=1e-8)

    K = 3000
    samples = prior.sample_posterior(
        repeat_items(A, K, 2), y.repeat_interleave(K, 0), 0.1, torch.Generator().manual_seed(4), method=method
    )
    samples = samples.reshape(2, K, -1)
    for i in range(2):
        mean_error, cov_error = whitened_errors(samples[i], means[i].reshape(-1), covariances[i])
        assert mean_error < 6 + 5 * math.sqrt(12) and cov_error < 2 * math.sqrt(42 / K)


@pytest.mark.parametrize(
    ("kind", "operator"), [("dense", "matrix"), ("low-rank", "mask"), ("dense", "fourier")]
)
def test_dense_and_cg_paths_draw_the_same_sample(kind, operator, device):
    """Matheron's rule from the same draws: the matrix-free solve reproduces the dense one."""
    prior = dense_prior((1, 2, 3)) if kind == "dense" else low_rank_prior()
    A, y = observations(prior, operator, 8, 0.05)
    prior, A, y = prior.to(device), A.to(device), y.to(device)
    noise_std = torch.linspace(0.03, 0.1, 8, dtype=F64, device=device)
    dense = prior.sample_posterior(A, y, noise_std, torch.Generator(device).manual_seed(5), method="dense")
    matrix_free = prior.sample_posterior(
        A, y, noise_std, torch.Generator(device).manual_seed(5), method="cg", tol=1e-12
    )
    assert dense.shape == (8, *prior.shape)
    torch.testing.assert_close(matrix_free, dense, atol=1e-9, rtol=0)


@pytest.mark.parametrize(("kind", "operator"), [("dense", "matrix"), ("low-rank", "mask")])
def test_log_evidence_matches_brute_force(kind, operator):
    prior = dense_prior((1, 2, 3)) if kind == "dense" else low_rank_prior()
    A, y = observations(prior, operator, 5, 0.1)
    noise_std = torch.linspace(0.05, 0.2, 5, dtype=F64)
    Sigma = prior.covariance_matrix()
    for i in range(5):
        M = A.A[i] if operator == "matrix" else torch.diag(A.mask[i].reshape(-1))
        cov = M @ Sigma @ M.T + noise_std[i] ** 2 * torch.eye(M.shape[0], dtype=F64)
        expected = MultivariateNormal(M @ prior.mean, cov).log_prob(y[i].reshape(-1))
        torch.testing.assert_close(prior.log_evidence(A, y, noise_std)[i], expected, atol=1e-10, rtol=1e-10)


def test_complex_measurements_are_circular_gaussian():
    """Fully sampled k-space of a real image, y = F x + n with E|n|^2 = s^2: as reals, F is an
    isometry and each part has variance s^2 / 2, so the posterior precision is Sigma^-1 + 2 / s^2
    and, at any x, log p(y) = log p(x) + log p(y | x) - log p(x | y) (Bayes)."""
    prior = dense_prior((1, 2, 3))
    A, y = observations(prior, "fourier", 2, 0.2)
    s2 = 0.04
    means, covariances = prior.posterior(A, y, 0.2)
    inverse = torch.linalg.inv(prior.covariance_matrix())
    precision = inverse + 2 / s2 * torch.eye(6, dtype=F64)
    expected = torch.linalg.solve(
        precision, (inverse @ prior.mean)[None].T + 2 / s2 * A.adjoint(y).reshape(2, 6).T
    ).T
    torch.testing.assert_close(
        covariances, torch.linalg.inv(precision).expand(2, 6, 6), atol=1e-10, rtol=1e-8
    )
    torch.testing.assert_close(means.reshape(2, 6), expected, atol=1e-10, rtol=1e-8)

    x = torch.zeros(2, 1, 2, 3, dtype=F64)
    residual = y - A(x)
    log_likelihood = -(residual.abs() ** 2).reshape(2, -1).sum(1) / s2 - 6 * math.log(math.pi * s2)
    log_posterior = torch.stack(
        [MultivariateNormal(means[i].reshape(6), covariances[i]).log_prob(x[i].reshape(6)) for i in range(2)]
    )
    bayes = prior.log_prob(x) + log_likelihood - log_posterior
    torch.testing.assert_close(prior.log_evidence(A, y, 0.2), bayes, atol=1e-9, rtol=1e-9)


def test_low_rank_em_on_masked_images_approaches_the_truth():
    """Rank-4 Gaussian images (1, 8, 8) plus a small diagonal, half the pixels missing per image.

    A maximum-likelihood fit with k free parameters loses about k / (2N) nats per held-out
    observation against the truth (k = 2d + dr - r(r-1)/2 = 612 for d = 64, r = 8; 0.61 nats at
    N = 500); the Monte-Carlo E-step adds an estimate of comparable variance, so the fit must come
    within k / N of the truth, while the N(0, I) start is some 57 nats below it.
    """
    g = torch.Generator().manual_seed(0)
    shape, d, rank, noise = (1, 8, 8), 64, 8, 0.05
    truth = GaussianPrior(
        0.3 * torch.randn(d, generator=g, dtype=F64),
        factor=0.5 * torch.randn(d, 4, generator=g, dtype=F64),
        diagonal=torch.full((d,), 0.01, dtype=F64),
        shape=shape,
    )

    def observe(n):
        A = Mask(random_mask(shape, 0.5, batch=n, generator=g).double())
        return A(truth.sample(n, g)) + noise * torch.randn(n, *shape, generator=g, dtype=F64), A

    N = 500
    (y, A), (y_test, A_test) = observe(N), observe(200)
    fit = fit_gaussian(y, A, noise, shape, rank=rank, iterations=20, samples=1, generator=g)
    assert fit.rank == rank and fit.shape == shape and (fit.diagonal > 0).all()

    def held_out(prior):
        return float(prior.log_evidence(A_test, y_test, noise).mean())

    start, fitted, best = held_out(GaussianPrior.standard(shape, rank=rank)), held_out(fit), held_out(truth)
    k = 2 * d + d * rank - rank * (rank - 1) // 2
    assert best - fitted < k / N
    assert fitted - start > 0.9 * (best - start)


def test_low_rank_history_and_init():
    """The history holds iterations + 1 evidences, and a given init is neither modified nor ignored."""
    prior = low_rank_prior(shape=(1, 2, 3), rank=2)
    A, y = observations(prior, "mask", 40, 0.1)
    init = GaussianPrior.standard((1, 2, 3), rank=2, dtype=torch.float32)
    history = []
    fit = fit_gaussian(
        y,
        A,
        0.1,
        (1, 2, 3),
        rank=2,
        iterations=3,
        init=init,
        history=history,
        generator=torch.Generator().manual_seed(0),
    )
    assert len(history) == 4 and history[0] == pytest.approx(
        float(GaussianPrior.standard((1, 2, 3), rank=2).log_evidence(A, y, 0.1).mean())
    )
    assert init.mean.dtype == torch.float32 and (init.factor == 0).all()
    assert fit.mean.dtype == F64 and history[-1] > history[0]


def test_low_rank_m_step_without_the_covariance_matrix(monkeypatch):
    """Above a size limit the principal components come from a randomized subspace iteration on
    the samples, not from the d x d covariance: with a clear spectral gap both give the same fit."""
    import cleanprior.learning.gaussian as module

    prior = low_rank_prior(shape=(1, 5, 8), rank=3)
    x = prior.sample(500, torch.Generator().manual_seed(0)).reshape(500, -1)
    centred = x - x.mean(0)
    exact = module._principal_components(centred, 3, 1e-3, None)
    monkeypatch.setattr(module, "_EIGH_LIMIT", 0)
    randomized = module._principal_components(centred, 3, 1e-3, torch.Generator().manual_seed(1))
    torch.testing.assert_close(randomized[0] @ randomized[0].T, exact[0] @ exact[0].T, atol=1e-8, rtol=0)
    torch.testing.assert_close(randomized[1], exact[1], atol=1e-8, rtol=0)


def test_state_dict_round_trip():
    prior = dense_prior()
    copy = GaussianPrior.standard((2, 3))
    copy.load_state_dict(prior.state_dict())
    x = torch.randn(3, 2, 3, dtype=F64)
    torch.testing.assert_close(copy(x, 0.5), prior(x, 0.5))
    assert prior.float().mean.dtype == torch.float32


def test_cg_warns_when_it_does_not_converge():
    prior = low_rank_prior()
    A, y = observations(prior, "mask", 4, 0.01)
    with pytest.warns(RuntimeWarning, match="conjugate gradients"):
        prior.sample_posterior(A, y, 0.01, method="cg", iterations=1, tol=1e-12)


def _counting_operator(calls):
    def forward(x):
        calls.append(1)
        return 2 * x

    return as_operator(forward, linear=True, x_shape=(3,))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"y": torch.full((4, 3), math.nan)}, "NaN"),
        ({"y": torch.zeros(4)}, "shape"),
        ({"noise_std": 0.0}, "positive"),
        ({"noise_std": torch.tensor([0.1, -0.1, 0.1, 0.1])}, "positive"),
        ({"noise_std": torch.ones(3)}, "one value per observation"),
        ({"rank": 4}, "rank"),
        ({"rank": 0}, "rank"),
        ({"iterations": 0}, "iterations"),
        ({"shape": (2, 2)}, "operator maps"),
        ({"init": GaussianPrior.standard((3,), rank=2)}, "rank 1"),
        ({"init": GaussianPrior.standard((4,))}, "shape"),
    ],
)
def test_fit_rejects_bad_input_before_work(change, message):
    calls = []
    arguments = {
        "y": torch.zeros(4, 3),
        "A": _counting_operator(calls),
        "noise_std": 0.1,
        "shape": (3,),
        "rank": 1,
    }
    arguments.update(change)
    with pytest.raises(ValueError, match=message):
        fit_gaussian(**arguments)
    # only a wrong signal shape is found by applying the operator (once, to zeros)
    assert len(calls) <= (1 if message == "operator maps" else 0)


def test_rejects_nonlinear_operators_and_bad_parameters():
    prior = dense_prior((3,), eigvals=[0.5, 1.0, 2.0])
    with pytest.raises(TypeError, match="linear"):
        prior.sample_posterior(lambda x: x**2, torch.zeros(2, 3, dtype=F64), 0.1)
    with pytest.raises(ValueError, match="method"):
        prior.sample_posterior(torch.eye(3, dtype=F64), torch.zeros(2, 3, dtype=F64), 0.1, method="svd")
    with pytest.raises(ValueError, match="either"):
        GaussianPrior(torch.zeros(3), torch.eye(3), factor=torch.zeros(3, 1), diagonal=torch.ones(3))
    with pytest.raises(ValueError, match="positive semi-definite"):
        GaussianPrior(torch.zeros(2), torch.tensor([[1.0, 2.0], [2.0, 1.0]]))
    with pytest.raises(ValueError, match="positive"):
        GaussianPrior(torch.zeros(3), factor=torch.zeros(3, 1), diagonal=torch.tensor([1.0, 0.0, 1.0]))
    with pytest.raises(ValueError, match="does not hold"):
        GaussianPrior(torch.zeros(3), torch.eye(3), shape=(2, 2))
