"""Every posterior method against the exact posterior of a Gaussian mixture.

Methods join the contract through ``tests/cases/posterior_*.py``: each defines ``CONTRACT``, a dict
from a method name to ``(options, fraction)``: ``sample_posterior`` options, and the largest
allowed sliced Wasserstein distance to exact posterior samples as a fraction of the unconditional
prior's distance. A test fails if a method of ``METHODS()`` has no case.
"""

import importlib
import math
import pathlib

import pytest
import torch

from cleanprior import GaussianMixture
from cleanprior.diffusion.samplers import NonFiniteError, Sampler
from cleanprior.metrics import sliced_wasserstein
from cleanprior.operators import FunctionOperator, Matrix
from cleanprior.posterior import METHODS, method_options, posterior_denoiser, sample_posterior

N = 1000  # posterior samples per check
NOISE = 0.1


def projection_problem():
    """A 2-D mixture of four components of which only the first coordinate is seen: the posterior
    splits evenly between two components (weights 0.5 / 0.5), a bimodal target."""
    g = torch.Generator().manual_seed(0)
    means = torch.tensor([[-1.0, -1.0], [1.0, 1.0], [-1.0, 1.0], [1.0, -1.0]]) * 0.7
    prior = GaussianMixture.isotropic(means, 0.15)
    A = torch.tensor([[1.0, 0.0]])
    x = prior.sample(1, g)
    y = x @ A.T + NOISE * torch.randn(1, 1, generator=g)
    return prior, A, y


@pytest.fixture(scope="module")
def problem():
    prior, A, y = projection_problem()
    posterior = prior.posterior(A[0:1], y[0], NOISE)
    g = torch.Generator().manual_seed(1)
    exact = posterior.sample(N, g).float()
    projections = lambda: torch.Generator().manual_seed(7)  # noqa: E731
    floor = torch.stack([sliced_wasserstein(posterior.sample(N, g).float(), exact, generator=projections()) for _ in range(3)]).mean()
    prior_distance = sliced_wasserstein(prior.sample(N, g), exact, generator=projections())
    return prior, A, y, exact, floor, prior_distance, projections


CONTRACT = {}
for path in sorted((pathlib.Path(__file__).parent / "cases").glob("posterior_*.py")):
    CONTRACT.update(importlib.import_module(f"cases.{path.stem}").CONTRACT)


@pytest.mark.parametrize("method", sorted(CONTRACT))
def test_method_beats_the_prior_on_the_exact_posterior(method, problem):
    prior, A, y, exact, floor, prior_distance, projections = problem
    options, fraction = CONTRACT[method]
    x = sample_posterior(prior, Matrix(A), y.repeat(N, 1), shape=(2,), noise_std=NOISE, method=method.split("[")[0],
                         generator=torch.Generator().manual_seed(2), **options)
    distance = sliced_wasserstein(x, exact, generator=projections())
    assert distance < fraction * prior_distance, f"{method}: {distance:.4f} vs prior {prior_distance:.4f} (floor {floor:.4f})"
    if method == "mmps":
        assert distance < 2 * floor, f"mmps: {distance:.4f} vs the exact floor {floor:.4f}"


def test_every_method_has_a_contract_case():
    names = {name.split("[")[0] for name in CONTRACT}
    assert set(METHODS()) <= names, sorted(set(METHODS()) - names)


@pytest.mark.parametrize("method", METHODS())
def test_every_method_runs_through_the_one_loop(method, monkeypatch):
    """Every method of the table walks the grid in Sampler.__call__: the outermost call into it
    is the method's run, and a non-finite denoiser is reported by it, naming a level."""
    loop = Sampler.__call__
    runs = []

    def spy(self, *args, **kwargs):
        runs.append(kwargs.get("check_every", 1))
        return loop(self, *args, **kwargs)

    monkeypatch.setattr(Sampler, "__call__", spy)
    prior, A, y = projection_problem()
    sample_posterior(prior, Matrix(A), y.repeat(4, 1), shape=(2,), noise_std=NOISE, method=method, steps=3,
                     generator=torch.Generator().manual_seed(0))
    assert runs and runs[0] != 0, runs  # the first, outermost walk is a checked one

    def broken(x, sigma):
        return prior(x, sigma) * torch.nan

    with pytest.raises(NonFiniteError, match=r"produced non-finite values .*(sigma|rho)=\d"):
        sample_posterior(broken, Matrix(A), y.repeat(4, 1), shape=(2,), noise_std=NOISE, method=method, steps=3,
                         generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("method", METHODS())
def test_no_step_reads_a_tensor_on_the_host(method, monkeypatch):
    """No host synchronisation inside a step: a step never turns a tensor into a Python value
    (on a GPU each such read waits for the device). The float64 grid levels that a walk inside a
    step reads are host tensors by construction and are let through."""
    reads = []
    depth = [0]
    for name in ("__bool__", "__int__", "__float__", "__index__", "item", "tolist"):
        def read(self, *args, _name=name, _original=getattr(torch.Tensor, name), **kwargs):
            if depth[0] and self.dtype != torch.float64:
                reads.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, read)
    for cls in (Sampler, *_subclasses(Sampler)):
        if "step" in vars(cls):
            def step(self, *args, _original=vars(cls)["step"], **kwargs):
                depth[0] += 1
                try:
                    return _original(self, *args, **kwargs)
                finally:
                    depth[0] -= 1

            monkeypatch.setattr(cls, "step", step)
    prior, A, y = projection_problem()
    sample_posterior(prior, Matrix(A), y.repeat(4, 1), shape=(2,), noise_std=NOISE, method=method, steps=3,
                     generator=torch.Generator().manual_seed(0))
    assert not reads, reads


def _subclasses(cls):
    return [c for sub in cls.__subclasses__() for c in (sub, *_subclasses(sub))]


def test_method_options_are_those_of_the_table():
    assert method_options("daps") == {"langevin_steps", "lr", "lr_min_ratio", "r_scale", "ode_steps"}
    assert method_options("pnpdm") == {"rho_max", "rho_min", "iterations_outer", "prior_steps", "iterations",
                                       "langevin_steps", "lr"}
    assert method_options("tds") == {"particles", "twist", "solver", "iterations", "twist_variance",
                                     "resample_threshold", "batch_size", "return_info"}
    assert method_options("dc") == {"mode", "step", "eta"}
    assert method_options("dps") == {"weight", "zeta", "widen"}
    assert method_options("mmps") == {"weight", "solver", "iterations"}
    assert method_options("pc") == {"weight", "solver", "iterations", "guidance"}


def test_mmps_is_exact_for_a_gaussian_prior():
    """With a Gaussian prior, Tweedie's covariance is exact and p(x | x_t) is Gaussian: MMPS with a
    converged solver samples the exact posterior (up to the sampler's discretisation)."""
    g = torch.Generator().manual_seed(3)
    prior = GaussianMixture(torch.ones(1), torch.tensor([[0.3, -0.2, 0.1]]), torch.tensor([[[0.5, 0.2, 0.0], [0.2, 0.4, 0.1], [0.0, 0.1, 0.3]]]))
    A = torch.randn(2, 3, generator=g)
    y = torch.tensor([[0.4, -0.3]])
    posterior = prior.posterior(A, y[0], 0.2)
    x = sample_posterior(prior, Matrix(A), y.repeat(4000, 1), shape=(3,), noise_std=0.2, method="mmps",
                         iterations=2, steps=128, sampler="heun", generator=g)
    assert torch.allclose(x.mean(0), posterior.means[0].float(), atol=0.03)
    assert torch.allclose(torch.cov(x.T), posterior.covariances[0].float(), atol=0.03)


def test_the_likelihood_weight_interpolates_prior_and_posterior(problem):
    prior, A, y, exact, floor, prior_distance, projections = problem
    unguided = sample_posterior(prior, Matrix(A), y.repeat(N, 1), shape=(2,), noise_std=NOISE, method="mmps",
                                weight=0.0, steps=32, sampler="ddpm", generator=torch.Generator().manual_seed(4))
    reference = prior.sample(N, torch.Generator().manual_seed(5))
    assert sliced_wasserstein(unguided, reference, generator=projections()) < 3 * floor


def test_dps_runs_through_a_nonlinear_operator():
    """y = |x_1| + n: DPS needs only vector-Jacobian products through the forward model.

    The component at (0, 1.5) has |x_1| = 0 and must be excluded (the prior gives it 1/3); both
    others explain y. The bare likelihood (widen=0) excludes it entirely; the default widened one
    (stable where the bare one diverges, see the next test) guides more gently at high noise.
    """
    prior = GaussianMixture.isotropic(torch.tensor([[-1.0, 0.0], [1.0, 0.0], [0.0, 1.5]]), 0.1)
    forward = FunctionOperator(lambda x: x[:, :1].abs())
    y = torch.full((500, 1), 1.0)
    for widen, excluded in ((0.0, 0.1), (1.0, 0.2)):
        x = sample_posterior(prior, forward, y, shape=(2,), noise_std=0.05, method="dps", widen=widen, steps=64,
                             sampler="ddpm", generator=torch.Generator().manual_seed(6))
        assert (x[:, 0].abs() - 1).abs().mean() < 0.2
        assert (x[:, 1] > 0.75).float().mean() < excluded
    with pytest.raises(TypeError, match="linear operator"):
        posterior_denoiser(prior, forward, y, noise_std=0.05, method="mmps")


def test_default_dps_is_stable_where_the_bare_likelihood_diverges():
    """A 3-D mixture through a random rank-2 matrix with noise 0.05: the bare Gaussian likelihood's
    step sigma_t^2 / sigma_y^2 overshoots (residual 10^3 to 10^16 times the prior's); the widened
    default brings the residual below half the prior samples' (measured 0.37 at 8 steps, 0.02 at 64)."""
    g = torch.Generator().manual_seed(9)
    prior = GaussianMixture.isotropic(torch.tensor([[-1.0, 0.0, 0.5], [1.0, 0.5, -0.5]]), 0.2)
    A = torch.randn(3, 2, 3, generator=g)
    x = prior.sample(3, g)
    y = torch.einsum("bmd,bd->bm", A, x)
    baseline = (torch.einsum("bmd,bd->bm", A, prior.sample(3, g)) - y).norm(dim=1).mean()
    for steps in (8, 64):
        samples = sample_posterior(prior, Matrix(A), y, shape=(3,), noise_std=0.05, method="dps", steps=steps,
                                   sampler="ddpm", generator=torch.Generator().manual_seed(steps))
        residual = (torch.einsum("bmd,bd->bm", A, samples) - y).norm(dim=1).mean()
        assert residual < 0.5 * baseline, (steps, residual, baseline)


def test_bad_observations_are_refused_before_sampling():
    prior = GaussianMixture.isotropic(torch.zeros(1, 3), 1.0)
    calls = []

    def counting(x, sigma):
        calls.append(1)
        return prior(x, sigma)

    A = Matrix(torch.randn(2, 3))
    with pytest.raises(ValueError, match=r"y has shape \(4, 3\)"):
        sample_posterior(counting, A, torch.zeros(4, 3), shape=(3,), noise_std=0.1)
    with pytest.raises(ValueError, match="does not take signals of shape"):
        sample_posterior(counting, A, torch.zeros(4, 2), shape=(5,), noise_std=0.1)
    with pytest.raises(ValueError, match="NaN"):
        sample_posterior(counting, A, torch.full((4, 2), math.nan), shape=(3,), noise_std=0.1)
    with pytest.raises(ValueError, match="noise_std"):
        sample_posterior(counting, A, torch.zeros(4, 2), shape=(3,), noise_std=-1.0)
    with pytest.raises(ValueError, match="unknown posterior method"):
        sample_posterior(counting, A, torch.zeros(4, 2), shape=(3,), noise_std=0.1, method="magic")
    assert not calls


def test_ccdf_start_from_the_pseudo_inverse():
    """Starting at a small level from A^+ y needs few steps and stays consistent with y."""
    prior = GaussianMixture.isotropic(torch.tensor([[0.5, -0.5, 0.2]]), 0.3)
    A = Matrix(torch.eye(3))
    y = torch.tensor([[0.4, -0.4, 0.3]]).repeat(2000, 1)
    x = sample_posterior(prior, A, y, shape=(3,), noise_std=0.1, method="mmps", iterations=3, steps=16,
                         sampler="ddpm", start="pinv", sigma_start=0.5, generator=torch.Generator().manual_seed(8))
    posterior = prior.posterior(torch.eye(3), y[0], 0.1)
    assert torch.allclose(x.mean(0), posterior.means[0].float(), atol=0.02)


@pytest.mark.parametrize("method", sorted(CONTRACT))
def test_per_observation_operators(method):
    """Each observation with its own matrix: every method keeps observation i with operator i
    (a method that repeats y over particles or samples must repeat the operator's parameters too)."""
    g = torch.Generator().manual_seed(9)
    prior = GaussianMixture.isotropic(torch.tensor([[-1.0, 0.0, 0.5], [1.0, 0.5, -0.5]]), 0.2)
    A = torch.randn(3, 2, 3, generator=g)
    x = prior.sample(3, g)
    y = torch.einsum("bmd,bd->bm", A, x)
    options = {**CONTRACT[method][0], "steps": 8}
    samples = sample_posterior(prior, Matrix(A), y, shape=(3,), noise_std=0.05, method=method.split("[")[0],
                               generator=g, **options)
    assert samples.shape == (3, 3) and torch.isfinite(samples).all()


def test_solver_breakdowns_are_reported():
    """A denoiser with a negative-definite Jacobian makes CG meet negative curvature: the samples
    stay finite and the user is told, with the count."""
    def bad(x, sigma):
        return -0.9 * x * (sigma[:, None] ** 2 + 1) / sigma[:, None] ** 2

    with pytest.warns(UserWarning, match="broke down"):
        x = sample_posterior(bad, Matrix(torch.eye(2)), torch.zeros(4, 2), shape=(2,), noise_std=0.01,
                             method="mmps", iterations=2, steps=4, sigma_max=1.0, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(x).all()


def test_compile_option_differentiates_through_the_compiled_prior(monkeypatch):
    """MMPS takes vector-Jacobian products through the prior denoiser; compiled (aot_eager backend,
    the graph inductor would build kernels for) it gives the same samples."""
    compile_ = torch.compile
    wrapped = []

    def spy(model, **options):
        wrapped.append(model)
        return compile_(model, **{**options, "backend": "aot_eager"})

    monkeypatch.setattr(torch, "compile", spy)
    prior, A, y = projection_problem()
    run = lambda **options: sample_posterior(prior, Matrix(A), y.repeat(8, 1), shape=(2,), noise_std=NOISE, method="mmps",  # noqa: E731
                                             steps=4, generator=torch.Generator().manual_seed(0), **options)
    plain, compiled = run(), run(compile=True)
    assert wrapped == [prior]
    assert torch.allclose(plain, compiled, atol=1e-5)
