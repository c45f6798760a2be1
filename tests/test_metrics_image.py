import math

import pytest
import torch

from cleanprior.metrics import psnr, ssim


def _skimage_ssim(x: torch.Tensor, y: torch.Tensor, data_range: float) -> torch.Tensor:
    """scikit-image's SSIM with Wang et al.'s Gaussian window, image by image."""
    from skimage.metrics import structural_similarity

    values = [
        structural_similarity(
            a.numpy(),
            b.numpy(),
            data_range=data_range,
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
            channel_axis=0,
        )
        for a, b in zip(x.double(), y.double())
    ]
    return torch.tensor(values, dtype=torch.float64)


def _structured(generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Smooth gradients, a disc and stripes, against a blurred, brightened, noisy copy: (2, 3, 24, 19)."""
    rows = torch.linspace(-1, 1, 24, dtype=torch.float64)[:, None]
    cols = torch.linspace(-1, 1, 19, dtype=torch.float64)[None, :]
    disc = ((rows**2 + cols**2) < 0.4).double()
    stripes = torch.sin(9 * cols + 4 * rows)
    gradient = 0.8 * rows * cols
    x = torch.stack([torch.stack([disc, stripes, gradient]), torch.stack([gradient, disc, stripes])]) * 2 - 0.5
    x = x.clamp(-1, 1)
    blurred = 0.25 * (x.roll(1, -1) + x.roll(-1, -1) + x.roll(1, -2) + x.roll(-1, -2))
    y = (0.7 * blurred + 0.2 + 0.1 * torch.randn(x.shape, generator=generator, dtype=torch.float64)).clamp(-1, 1)
    return x, y


def test_ssim_matches_scikit_image_on_random_and_structured_images():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 2, 20, 17, generator=g, dtype=torch.float64) * 2 - 1
    y = (x + 0.4 * torch.randn(x.shape, generator=g, dtype=torch.float64)).clamp(-1, 1)
    xs, ys = _structured(g)
    for a, b in ((x, y), (xs, ys)):
        expected = _skimage_ssim(a, b, 2.0)
        torch.testing.assert_close(ssim(a, b), expected, atol=1e-4, rtol=0)
        torch.testing.assert_close(ssim(a.float(), b.float()).double(), expected, atol=1e-4, rtol=0)
    # Images in [0, 1] with their range.
    torch.testing.assert_close(ssim((x + 1) / 2, (y + 1) / 2, data_range=1.0), _skimage_ssim((x + 1) / 2, (y + 1) / 2, 1.0), atol=1e-4, rtol=0)


def test_ssim_with_a_smaller_window_matches_the_truncated_gaussian_filter():
    """window=7 is the Gaussian truncated at radius 3 (scipy's truncate=2 for sigma 1.5), on the valid pixels."""
    from scipy.ndimage import gaussian_filter

    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 1, 8, 8, generator=g, dtype=torch.float64) * 2 - 1
    y = (x + 0.3 * torch.randn(x.shape, generator=g, dtype=torch.float64)).clamp(-1, 1)
    expected = []
    for a, b in zip(x[:, 0].numpy(), y[:, 0].numpy()):
        mu_a, mu_b, aa, bb, ab = (gaussian_filter(m, sigma=1.5, truncate=2.0) for m in (a, b, a * a, b * b, a * b))
        c1, c2 = (0.01 * 2) ** 2, (0.03 * 2) ** 2
        index = (2 * mu_a * mu_b + c1) * (2 * (ab - mu_a * mu_b) + c2) / ((mu_a**2 + mu_b**2 + c1) * (aa - mu_a**2 + bb - mu_b**2 + c2))
        expected.append(index[3:-3, 3:-3].mean())
    torch.testing.assert_close(ssim(x, y, window=7), torch.tensor(expected, dtype=torch.float64), atol=1e-12, rtol=0)


def test_exact_values_of_psnr_and_ssim():
    g = torch.Generator().manual_seed(2)
    x = torch.rand(3, 1, 16, 16, generator=g, dtype=torch.float64) * 2 - 1
    assert torch.equal(psnr(x, x), torch.full((3,), math.inf, dtype=torch.float64))
    assert torch.equal(ssim(x, x), torch.ones(3, dtype=torch.float64))
    # A constant offset c: MSE = c^2, so PSNR = 20 log10(R / c), per image.
    offsets = torch.tensor([0.1, 0.5, 1.0], dtype=torch.float64)
    expected = 20 * torch.log10(2.0 / offsets)
    torch.testing.assert_close(psnr(x + offsets[:, None, None, None], x), expected, rtol=1e-12, atol=0)
    assert psnr(x + 0.1, x, data_range=1.0)[0].item() == pytest.approx(20.0, rel=1e-12)
    # Constant images a and b: no variance, so SSIM = (2ab + C1) / (a^2 + b^2 + C1).
    a, b, c1 = 0.3, -0.2, (0.01 * 2) ** 2
    constant = ssim(torch.full((1, 2, 12, 12), a, dtype=torch.float64), torch.full((1, 2, 12, 12), b, dtype=torch.float64))
    assert constant.item() == pytest.approx((2 * a * b + c1) / (a**2 + b**2 + c1), rel=1e-12)
    # Symmetric, and per image: a batch gives the values of its images one by one.
    y = x.flip(0)
    torch.testing.assert_close(ssim(x, y), ssim(y, x), rtol=1e-12, atol=0)
    torch.testing.assert_close(ssim(x, y), torch.cat([ssim(x[i : i + 1], y[i : i + 1]) for i in range(3)]), rtol=1e-12, atol=0)


def test_metrics_run_on_every_device(device):
    g = torch.Generator().manual_seed(3)
    x = torch.rand(2, 3, 14, 14, generator=g) * 2 - 1
    y = (x + 0.2 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    for metric in (psnr, ssim):
        on_device = metric(x.to(device), y.to(device))
        assert on_device.device.type == device.type and on_device.shape == (2,)
        torch.testing.assert_close(on_device.cpu(), metric(x, y), atol=1e-5, rtol=0)


def test_bad_inputs_are_refused():
    x = torch.zeros(2, 1, 12, 12)
    with pytest.raises(ValueError, match="reference has shape"):
        psnr(x, torch.zeros(2, 1, 12, 11))
    with pytest.raises(ValueError, match="finite"):
        ssim(x, torch.full_like(x, float("nan")))
    with pytest.raises(ValueError, match="data_range"):
        psnr(x, x, data_range=0.0)
    with pytest.raises(ValueError, match="exceeds"):
        ssim(torch.zeros(2, 1, 8, 8), torch.zeros(2, 1, 8, 8))
    with pytest.raises(ValueError, match="odd"):
        ssim(x, x, window=6)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        ssim(torch.zeros(2, 12, 12), torch.zeros(2, 12, 12))
    assert torch.isfinite(ssim(torch.zeros(2, 1, 8, 8), torch.ones(2, 1, 8, 8), window=7)).all()
