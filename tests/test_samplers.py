"""Every sampler, run on the exact mixture denoiser, must reproduce the mixture."""

import math

import pytest
import torch

from cleanprior import GaussianMixture, sample_prior
from cleanprior.diffusion import NonFiniteError, edm_grid, get_sampler, sample
from cleanprior.diffusion.samplers import CHECK_EVERY
from cleanprior.metrics import sliced_wasserstein

# Steps at which each sampler's discretisation error is well below the tolerances below; first-order
# samplers converge as O(1/N), so they need more steps than Heun.
SAMPLERS = {
    "ddim": dict(steps=128),
    "ddpm": dict(steps=256),
    "heun": dict(steps=64),
    "pc": dict(steps=128, corrections=1, snr=0.1),
}
# In 64-D the within-component spread exposes the O(1/N) error of first-order steps: DDIM shrinks it
# by 9% at 64 steps, 5% at 128 and 1.2% at 512.
SAMPLERS_64D = {**SAMPLERS, "ddim": dict(steps=512), "ddpm": dict(steps=1024)}


def mixture(d, K, seed, lo=0.1, hi=0.3):
    g = torch.Generator().manual_seed(seed)
    means = 2 * torch.rand(K, d, generator=g) - 1
    stds = lo + (hi - lo) * torch.rand(K, generator=g)
    weights = torch.rand(K, generator=g) + 0.5
    return GaussianMixture.isotropic(means, stds, weights)


@pytest.fixture(scope="module")
def mixture_2d():
    gm = mixture(2, 8, seed=0)
    n = 2000
    g = torch.Generator().manual_seed(1)
    reference = gm.sample(n, g)
    # the exact-vs-exact floor, averaged over independent pairs of sets
    floor = torch.stack(
        [sliced_wasserstein(gm.sample(n, g), reference, generator=torch.Generator().manual_seed(9)) for _ in range(4)]
    ).mean()
    return gm, reference, floor


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_sampler_reproduces_2d_mixture(name, mixture_2d):
    gm, reference, floor = mixture_2d
    options = SAMPLERS[name]
    x = sample_prior(gm, reference.shape[0], shape=(2,), sampler=name, generator=torch.Generator().manual_seed(2), **options)
    sw = sliced_wasserstein(x, reference, generator=torch.Generator().manual_seed(9))
    assert sw < 2.0 * floor, f"{name}: SW {sw:.4f} vs exact floor {floor:.4f}"


def test_the_2d_check_can_fail(mixture_2d):
    """Four DDIM steps are far from the mixture: the same check must reject them."""
    gm, reference, floor = mixture_2d
    x = sample_prior(gm, reference.shape[0], shape=(2,), steps=4, generator=torch.Generator().manual_seed(2))
    assert sliced_wasserstein(x, reference, generator=torch.Generator().manual_seed(9)) > 3.0 * floor


def spread_and_occupancy(gm, x):
    """Per sample, ||x - mu_k||^2 / (d s_k^2) for its most likely component k (about 1 for exact
    samples, with standard error sqrt(2/d)/sqrt(n)), and the components' occupancy frequencies."""
    _, _, log_w = gm._component_terms(x, torch.zeros(x.shape[0]))
    k = log_w.argmax(-1)
    ratio = ((x - gm.means[k]) ** 2).sum(-1) / (gm.eigvals[k, 0] * x.shape[1])
    occupancy = torch.bincount(k, minlength=gm.components).float() / x.shape[0]
    return ratio.mean().item(), occupancy


@pytest.fixture(scope="module")
def mixture_64d():
    return mixture(64, 8, seed=0)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_sampler_reproduces_64d_mixture(name, mixture_64d):
    """In 64-D, the within-component spread is the sharp test: a first-order sampler with too few
    steps shrinks it by several percent (64 DDIM steps: -9%); exact samples give 1 +- 0.005."""
    gm = mixture_64d
    n = 2000
    x = sample_prior(gm, n, shape=(64,), sampler=name, generator=torch.Generator().manual_seed(3), **SAMPLERS_64D[name])
    exact = gm.sample(n, torch.Generator().manual_seed(4))
    ratio, occupancy = spread_and_occupancy(gm, x)
    exact_ratio, _ = spread_and_occupancy(gm, exact)
    assert abs(exact_ratio - 1) < 0.02
    assert abs(ratio - 1) < 0.04, f"{name}: within-component spread {ratio:.3f}"
    # occupancy: binomial standard error <= sqrt(0.25 / 2000) = 0.011
    assert (occupancy - gm.weights).abs().max() < 0.04
    floor = sliced_wasserstein(gm.sample(n, torch.Generator().manual_seed(5)), exact, generator=torch.Generator().manual_seed(9))
    assert sliced_wasserstein(x, exact, generator=torch.Generator().manual_seed(9)) < 1.5 * floor


class Counting:
    def __init__(self, denoiser):
        self.denoiser, self.calls = denoiser, 0

    def __call__(self, x, sigma):
        self.calls += 1
        return self.denoiser(x, sigma)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_evaluation_count_and_interface(name):
    gm = mixture(3, 2, seed=1)
    counting = Counting(gm)
    sampler = get_sampler(name)
    x = sample(counting, 5 * torch.randn(4, 3), edm_grid(10, 0.01, 5.0), sampler=sampler, generator=torch.Generator().manual_seed(0))
    assert x.shape == (4, 3)
    assert counting.calls == sampler.evaluations(10)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_reproducible_with_a_generator(name):
    gm = mixture(2, 3, seed=1)
    a = sample_prior(gm, 6, shape=(2,), steps=8, sampler=name, generator=torch.Generator().manual_seed(7))
    b = sample_prior(gm, 6, shape=(2,), steps=8, sampler=name, generator=torch.Generator().manual_seed(7))
    c = sample_prior(gm, 6, shape=(2,), steps=8, sampler=name, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_single_gaussian_deterministic_ddim_is_exact_in_the_limit():
    """For N(mu, s^2 I) the probability-flow ODE is linear; DDIM maps sigma_max noise to
    mu + s * z / sqrt(1 + sigma_max^2 / s^2)... up to a first-order error. The flow is linear, so
    the error is the same fraction of x - mu for every z: about 1.1e-3 at 2000 steps, four times
    smaller than at 500 (measured 4.4e-3 and 1.09e-3)."""
    mu, s = torch.tensor([[0.3, -0.2]], dtype=torch.float64), 0.5
    gm = GaussianMixture.isotropic(mu, s)
    z = torch.randn(5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    sigma_max = 10.0
    # the flow keeps (x - mu) / sqrt(s^2 + sigma^2) constant
    expected = mu + s * z * sigma_max / math.sqrt(s**2 + sigma_max**2)
    errors = []
    for steps in (500, 2000):
        x = sample(gm, mu + sigma_max * z, edm_grid(steps, 1e-4, sigma_max))
        errors.append(((x - mu) / (expected - mu) - 1).abs().max().item())
    assert errors[1] < 2e-3
    assert 3.5 < errors[0] / errors[1] < 4.5  # first order in the step


def test_ccdf_start_from_an_intermediate_level():
    """Starting at a small level near a point keeps the sample near the component it came from."""
    gm = GaussianMixture.isotropic(torch.tensor([[-2.0], [2.0]]), 0.1)
    x0 = torch.full((500, 1), 2.0)
    x = sample(gm, x0 + 0.3 * torch.randn(500, 1), edm_grid(32, 0.002, 0.3), sampler="ddpm")
    assert (x > 0).all()
    assert abs(x.std().item() - 0.1) < 0.02


def test_sample_prior_options_and_errors():
    gm = mixture(2, 3, seed=1)
    x = sample_prior(gm, 7, shape=(2,), steps=4, batch_size=3, dtype=torch.float64, grid="exponential")
    assert x.shape == (7, 2) and x.dtype == torch.float64
    with pytest.raises(ValueError, match="unknown sampler"):
        sample_prior(gm, 2, shape=(2,), sampler="rk45")
    with pytest.raises(TypeError, match="unknown options"):
        sample_prior(gm, 2, shape=(2,), temperature=2.0)
    with pytest.raises(TypeError, match="does not take"):
        sample_prior(gm, 2, shape=(2,), sampler="heun", eta=0.5)
    with pytest.raises(ValueError, match="eta"):
        get_sampler("ddim", eta=2.0)
    with pytest.raises(ValueError, match="n must be a positive integer"):
        sample_prior(gm, 0, shape=(2,))
    with pytest.raises(ValueError, match="strictly decreasing"):
        sample(gm, torch.zeros(2, 2), [1.0, 2.0, 0.0])


def test_non_finite_denoiser_output_is_reported_with_its_level():
    def broken(x, sigma):
        return torch.where(sigma[:, None] < 1.0, torch.full_like(x, math.nan), x * 0)

    with pytest.raises(NonFiniteError, match="from sigma=0.5 to sigma=0"):
        sample(broken, torch.zeros(2, 2), [4.0, 2.0, 1.0, 0.5, 0.0])


def test_non_finite_report_waits_for_the_check_and_names_the_first_bad_step():
    """The loop reads its device-side flag every CHECK_EVERY steps, not every step: a breakdown at
    step 3 of 40 runs on to step CHECK_EVERY, and the report names step 3, not a later one."""
    levels = torch.linspace(4.0, 0.0, 41, dtype=torch.float64)
    calls = []

    def broken(x, sigma):
        calls.append(float(sigma[0]))
        return x * math.nan if len(calls) == 4 else x * 0.5

    with pytest.raises(NonFiniteError, match=f"from sigma={levels[3].item():.4g} to sigma={levels[4].item():.4g}"):
        sample(broken, torch.zeros(2, 2), levels)
    assert len(calls) == CHECK_EVERY
    calls.clear()
    with pytest.raises(NonFiniteError, match="from sigma=3.7 to sigma=3.6"):
        sample(broken, torch.zeros(2, 2), levels[:6])  # a short grid is checked at its end
    assert torch.isnan(get_sampler("ddim")(lambda x, s: x * math.nan, torch.zeros(2, 2), levels, check_every=0)).all()


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_samples_stay_on_the_device(name, device):
    gm = mixture(2, 3, seed=1).to(device)
    g = torch.Generator(device=device).manual_seed(0)
    x = sample_prior(gm, 16, shape=(2,), steps=8, sampler=name, generator=g)
    assert x.device.type == device.type and x.dtype == torch.float32


def test_compile_option_wraps_the_denoiser_and_agrees(monkeypatch):
    """compile=True hands the denoiser to torch.compile (here with the aot_eager backend, which
    traces the same graph without building C++ kernels: inductor takes half a minute on a CPU)."""
    compile_ = torch.compile
    wrapped = []

    def spy(model, **options):
        wrapped.append(model)
        return compile_(model, **{**options, "backend": "aot_eager"})

    monkeypatch.setattr(torch, "compile", spy)
    gm = mixture(2, 3, seed=1)
    plain = sample_prior(gm, 8, shape=(2,), steps=6, sampler="heun", generator=torch.Generator().manual_seed(0))
    assert not wrapped
    compiled = sample_prior(gm, 8, shape=(2,), steps=6, sampler="heun", generator=torch.Generator().manual_seed(0),
                            compile=True)
    assert wrapped == [gm]
    assert torch.allclose(plain, compiled, atol=1e-5)


def test_a_generator_on_another_device_seeds_one_where_the_network_is(device):
    """A CPU generator with a network on the device samples there, reproducibly."""
    from cleanprior import PreconditionedDenoiser
    from cleanprior.nn import MLP

    torch.manual_seed(0)
    denoiser = PreconditionedDenoiser(MLP(2, hidden=(16,)), sigma_data=0.5).to(device).eval()
    draws = [sample_prior(denoiser, 4, shape=(2,), steps=4, sampler="ddpm",
                          generator=torch.Generator().manual_seed(3)) for _ in range(2)]
    assert draws[0].device.type == device.type
    assert torch.equal(draws[0], draws[1])
