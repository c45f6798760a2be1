import math
import sys
import types

import pytest
import torch

from cleanprior.data import digits
from cleanprior.metrics import (
    FeatureNetwork,
    feature_network,
    frechet_distance,
    frechet_distance_features,
    frechet_features,
    inception_fid,
)
from cleanprior.metrics import frechet
from cleanprior.operators import random_mask

# A few Adam steps on the 8x8 digits: enough for features that tell digits from noise, in well
# under a second. The default budget is for users, not for tests.
STEPS = 50


def _random_covariance(d: int, rank: int, generator: torch.Generator) -> torch.Tensor:
    factor = torch.randn(d, rank, generator=generator, dtype=torch.float64)
    return factor @ factor.T / rank


def test_frechet_distance_of_diagonal_gaussians():
    """Commuting covariances: d^2 = |mu1 - mu2|^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2."""
    g = torch.Generator().manual_seed(0)
    mu1, mu2 = torch.randn(2, 6, generator=g, dtype=torch.float64)
    a, b = torch.rand(2, 6, generator=g, dtype=torch.float64) * 3
    expected = (mu1 - mu2).square().sum() + (a.sqrt() - b.sqrt()).square().sum()
    assert frechet_distance(mu1, torch.diag(a), mu2, torch.diag(b)) == pytest.approx(expected.item(), rel=1e-12)
    # One-dimensional: the 2-Wasserstein distance (m1 - m2)^2 + (s1 - s2)^2.
    assert frechet_distance(torch.tensor([1.0]), torch.tensor([[4.0]]), torch.tensor([-1.0]), torch.tensor([[1.0]])) == pytest.approx(5.0, rel=1e-12)


def test_frechet_distance_of_non_commuting_gaussians_in_two_dimensions():
    """For 2x2 PSD M, tr sqrt(M) = sqrt(tr M + 2 sqrt(det M)); here M = C1^1/2 C2 C1^1/2."""
    c1 = torch.tensor([[2.0, 0.7], [0.7, 1.0]], dtype=torch.float64)
    c2 = torch.tensor([[0.5, -0.3], [-0.3, 1.5]], dtype=torch.float64)
    cross = math.sqrt(torch.trace(c1 @ c2).item() + 2 * math.sqrt(torch.det(c1).item() * torch.det(c2).item()))
    expected = 1.0**2 + 2.0**2 + torch.trace(c1).item() + torch.trace(c2).item() - 2 * cross
    mu1, mu2 = torch.tensor([0.0, 0.0]), torch.tensor([1.0, -2.0])
    assert frechet_distance(mu1, c1, mu2, c2) == pytest.approx(expected, rel=1e-12)
    assert frechet_distance(mu2, c2, mu1, c1) == pytest.approx(expected, rel=1e-12)


def test_frechet_distance_with_rank_deficient_covariances():
    """Degenerate Gaussians on lines u and v: d^2 = |u|^2 + |v|^2 - 2 |u . v| (and tr C2 when C1 = 0)."""
    u = torch.tensor([1.0, 2.0, 0.0, -1.0], dtype=torch.float64)
    v = torch.tensor([0.5, -1.0, 3.0, 2.0], dtype=torch.float64)
    zero = torch.zeros(4, dtype=torch.float64)
    expected = u.dot(u) + v.dot(v) - 2 * u.dot(v).abs()
    assert frechet_distance(zero, torch.outer(u, u), zero, torch.outer(v, v)) == pytest.approx(expected.item(), rel=1e-12)
    assert frechet_distance(zero, torch.zeros(4, 4), u, torch.outer(v, v)) == pytest.approx((u.dot(u) + v.dot(v)).item(), rel=1e-12)
    # A covariance of rank 30 in 64 dimensions against itself (fewer samples than features).
    g = torch.Generator().manual_seed(1)
    cov = _random_covariance(64, 30, g)
    mu = torch.randn(64, generator=g, dtype=torch.float64)
    assert frechet_distance(mu, cov, mu, cov) < 1e-12 * torch.trace(cov).item()
    # Full rank, non-commuting: symmetric in its two arguments.
    c1, c2 = _random_covariance(10, 20, g), _random_covariance(10, 20, g)
    assert frechet_distance(zero[:1].expand(10), c1, mu[:10], c2) == pytest.approx(frechet_distance(mu[:10], c2, zero[:1].expand(10), c1), rel=1e-9)


def test_frechet_distance_refuses_bad_inputs():
    eye = torch.eye(3)
    with pytest.raises(ValueError, match="mu2"):
        frechet_distance(torch.zeros(3), eye, torch.zeros(4), eye)
    with pytest.raises(ValueError, match="cov2"):
        frechet_distance(torch.zeros(3), eye, torch.zeros(3), torch.eye(4))
    with pytest.raises(ValueError, match="cov1 must be positive semi-definite"):
        frechet_distance(torch.zeros(3), -eye, torch.zeros(3), eye)
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(torch.full((3,), float("nan")), eye, torch.zeros(3), eye)


@pytest.fixture(scope="module")
def digits_network(tmp_path_factory) -> FeatureNetwork:
    cache = tmp_path_factory.mktemp("features")
    return feature_network("digits", cache_dir=cache, steps=STEPS, generator=torch.Generator().manual_seed(0))


def test_feature_network_is_trained_once_then_loaded_from_the_cache(tmp_path, monkeypatch):
    calls = []
    train = frechet._train
    monkeypatch.setattr(frechet, "_train", lambda *args, **kwargs: (calls.append(1), train(*args, **kwargs))[1])
    monkeypatch.setenv("CLEANPRIOR_CACHE", str(tmp_path))

    first = feature_network("digits", steps=STEPS, generator=torch.Generator().manual_seed(0))
    (path,) = tmp_path.glob("*.pt")
    assert "digits" in path.name and f"v{frechet.FEATURE_NETWORK_VERSION}" in path.name
    assert len(calls) == 1 and first.kind == "classifier" and not first.training
    assert 0.5 < first.metrics["test_accuracy"] <= 1.0

    second = feature_network("digits", steps=STEPS)
    assert len(calls) == 1
    assert second.metrics == first.metrics
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), name
    assert not list(tmp_path.glob(".*.tmp"))

    # Another budget is another network, not the cached one.
    feature_network("digits", steps=STEPS + 1)
    assert len(calls) == 2 and len(list(tmp_path.glob("*.pt"))) == 2


def test_a_corrupt_cache_file_is_retrained_with_a_warning(tmp_path, monkeypatch):
    calls = []
    train = frechet._train
    monkeypatch.setattr(frechet, "_train", lambda *args, **kwargs: (calls.append(1), train(*args, **kwargs))[1])
    feature_network("digits", cache_dir=tmp_path, steps=STEPS)
    (path,) = tmp_path.glob("*.pt")
    path.write_bytes(path.read_bytes()[:1000])

    with pytest.warns(RuntimeWarning, match="retraining"):
        network = feature_network("digits", cache_dir=tmp_path, steps=STEPS)
    assert len(calls) == 2 and network.kind == "classifier"
    # The rewritten file loads again.
    feature_network("digits", cache_dir=tmp_path, steps=STEPS)
    assert len(calls) == 2


def test_feature_distance_separates_clean_digits_from_noise_and_masked_images(digits_network):
    """Two halves of the test split differ only by sampling; noise and half-masked digits do not.

    The half-vs-half value is the finite-sample floor (about k / N for k features and N images
    per set); a distribution shift must stand well above it.
    """
    g = torch.Generator().manual_seed(2)
    test = digits("test")
    a, b = test[0::2], test[1::2]
    floor = frechet_distance_features(a, b, digits_network)
    noise = torch.rand(b.shape, generator=g) * 2 - 1
    masked = b * random_mask((1, 8, 8), 0.5, batch=b.shape[0], generator=g)
    assert frechet_distance_features(a, noise, digits_network) > 10 * floor
    assert frechet_distance_features(a, masked, digits_network) > 4 * floor
    assert frechet_distance_features(a, a, digits_network) < 1e-6 * floor


def test_features_do_not_depend_on_the_batch_size(digits_network):
    x = digits("test")[:37]
    features = frechet_features(x, digits_network, batch_size=256)
    assert features.shape == (37, digits_network.dimension) and features.dtype == torch.float32
    torch.testing.assert_close(frechet_features(x, digits_network, batch_size=5), features, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=r"x must be images of shape \(N, 1, 8, 8\)"):
        frechet_features(torch.zeros(3, 1, 28, 28), digits_network)
    with pytest.raises(ValueError, match="at least 2 images"):
        frechet_distance_features(x[:1], x, digits_network)


def test_unlabelled_faces_train_a_denoising_autoencoder(tmp_path):
    network = feature_network("faces", cache_dir=tmp_path, steps=3, batch_size=16, generator=torch.Generator().manual_seed(0))
    assert network.kind == "autoencoder" and "test_denoising_mse" in network.metrics
    x = torch.zeros(2, 1, 32, 32)
    assert frechet_features(x, network).shape == (2, 64)
    assert network(x).shape == x.shape


def test_feature_network_refuses_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset 'cifar'"):
        feature_network("cifar", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="steps"):
        feature_network("digits", cache_dir=tmp_path, steps=0)
    with pytest.raises(ValueError, match="does not hold images"):
        feature_network("manifold", cache_dir=tmp_path, steps=1)


def test_inception_fid_explains_how_to_make_pytorch_fid_available(monkeypatch, tmp_path):
    x = torch.zeros(4, 1, 16, 16)
    with pytest.raises(ValueError, match="samples"):
        inception_fid(torch.zeros(4, 2, 16, 16), x)
    # The package missing (whether or not this machine has it).
    monkeypatch.setitem(sys.modules, "pytorch_fid", None)
    monkeypatch.setitem(sys.modules, "pytorch_fid.inception", None)
    with pytest.raises(RuntimeError, match="pip install pytorch-fid"):
        inception_fid(x, x)

    # The package present without its weights: a clear error, and no download attempted.
    built = []
    package = types.ModuleType("pytorch_fid")
    inception = types.ModuleType("pytorch_fid.inception")
    inception.FID_WEIGHTS_URL = "https://example.invalid/fid_weights/pt_inception-test.pth"
    inception.InceptionV3 = lambda *args, **kwargs: built.append(1)
    package.inception = inception
    monkeypatch.setitem(sys.modules, "pytorch_fid", package)
    monkeypatch.setitem(sys.modules, "pytorch_fid.inception", inception)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(RuntimeError, match=r"pt_inception-test\.pth.*does not download"):
        inception_fid(x, x)
    assert not built
