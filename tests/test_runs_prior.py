import torch
from PIL import Image

from cleanprior import GaussianMixture
from cleanprior.operators import Mask, random_mask
from cleanprior.runs.prior import reconstruction_figure


def test_reconstruction_figure_beats_the_observation(tmp_path):
    """On an exact 16-D image prior, the posterior mean of masked images is far closer to the truth
    than the zero-filled observation, and the figure has its five rows of B tiles."""
    g = torch.Generator().manual_seed(0)
    prior = GaussianMixture.isotropic(torch.rand(3, 16, generator=g) * 2 - 1, 0.05, shape=(1, 4, 4))
    clean = prior.sample(6, g)
    mask = Mask(random_mask((1, 4, 4), 0.5, batch=6, generator=g))
    errors = reconstruction_figure(prior, clean, mask, 0.05, tmp_path / "r.png", samples=3, steps=32,
                                   sampler="ddpm", iterations=2, generator=g)
    assert errors["mse_posterior_mean"] < 0.25 * errors["mse_observation"]
    grid = Image.open(tmp_path / "r.png")
    assert grid.size == (6 * 4 + 7, 5 * 4 + 6)


def test_train_prior_is_a_function_of_its_seed(tmp_path):
    """Same seed, same weights (the initialisation included); another seed, other weights; the
    caller's global generator is left as it was."""
    from cleanprior.diffusion.training import TrainConfig
    from cleanprior.runs.prior import NetworkConfig, SampleConfig, train_prior

    x = torch.randn(64, 3, generator=torch.Generator().manual_seed(1))
    options = dict(network=NetworkConfig(hidden=(16, 16)), sampling=SampleConfig(n=2, steps=2),
                   training=TrainConfig(steps=3, batch_size=8, progress=False), seed=5)
    state = torch.random.get_rng_state()
    first = train_prior(x, tmp_path / "a", **options)
    assert torch.equal(torch.random.get_rng_state(), state)
    second = train_prior(x, tmp_path / "b", **options)
    third = train_prior(x, tmp_path / "c", **dict(options, seed=6))
    for a, b, c in zip(first.parameters(), second.parameters(), third.parameters()):
        assert torch.equal(a, b)
    assert any(not torch.equal(a, c) for a, c in zip(first.parameters(), third.parameters()))
