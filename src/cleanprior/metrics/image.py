r"""Image quality against a ground truth: the peak signal-to-noise ratio and the structural similarity.

For an image :math:`x` and its reference :math:`x^\star`, both with :math:`n` pixels (all channels),
and the width :math:`R` of the data's range (2 for images in :math:`[-1, 1]`):

.. math::
    \operatorname{PSNR}(x, x^\star) = 10 \log_{10} \frac{R^2}{\tfrac1n \|x - x^\star\|^2},

in decibels, :math:`+\infty` for :math:`x = x^\star`. The structural similarity compares local
means, variances and covariances, weighted by a Gaussian window :math:`w` around every pixel,

.. math::
    \operatorname{SSIM}(x, x^\star) = \operatorname{mean}_{p}\,
    \frac{(2 \mu_x \mu_{x^\star} + C_1)(2 \sigma_{x x^\star} + C_2)}
         {(\mu_x^2 + \mu_{x^\star}^2 + C_1)(\sigma_x^2 + \sigma_{x^\star}^2 + C_2)},
    \qquad C_1 = (0.01 R)^2, \quad C_2 = (0.03 R)^2,

with :math:`\mu_x = w * x`, :math:`\sigma_x^2 = w * x^2 - \mu_x^2` and
:math:`\sigma_{x x^\star} = w * (x x^\star) - \mu_x \mu_{x^\star}` (population moments), averaged over
the pixels :math:`p` whose window lies inside the image and over the channels. Both metrics are
computed per image, so a batch gives one value per image.

References:
    Wang, Bovik, Sheikh & Simoncelli (2004). Image Quality Assessment: From Error Visibility to
    Structural Similarity. IEEE Transactions on Image Processing 13(4).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["psnr", "ssim"]


def _check_pair(x: Tensor, reference: Tensor, data_range: float) -> None:
    if not isinstance(x, Tensor) or not isinstance(reference, Tensor):
        raise TypeError("x and reference must be tensors")
    if x.shape != reference.shape:
        raise ValueError(f"x has shape {tuple(x.shape)} but reference has shape {tuple(reference.shape)}")
    if x.ndim < 2 or x.shape[0] == 0:
        raise ValueError(f"x must be a non-empty batch of shape (B, *shape), got {tuple(x.shape)}")
    if x.is_complex() or reference.is_complex() or not (x.is_floating_point() and reference.is_floating_point()):
        raise ValueError(f"x and reference must be real floating-point tensors, got {x.dtype} and {reference.dtype}")
    if not (torch.isfinite(x).all() and torch.isfinite(reference).all()):
        raise ValueError("x and reference must be finite (no NaN or infinite values)")
    if not (isinstance(data_range, (int, float)) and math.isfinite(data_range) and data_range > 0):
        raise ValueError(f"data_range must be a positive finite number, got {data_range!r}")


def psnr(x: Tensor, reference: Tensor, data_range: float = 2.0) -> Tensor:
    r"""The peak signal-to-noise ratio :math:`10 \log_{10} (R^2 / \mathrm{MSE})` of every image, in dB.

    Arguments:
        x: Estimates, shape ``(B, *shape)`` (images ``(B, C, H, W)``), real.
        reference: The ground truth, the shape of ``x``.
        data_range: :math:`R`, the width of the data's range (2 for :math:`[-1, 1]`).

    Returns:
        Shape ``(B,)``, in the dtype of ``x``; ``inf`` where an image equals its reference.

    Raises:
        ValueError: For mismatched shapes, non-finite values or a non-positive range.
    """
    _check_pair(x, reference, data_range)
    dtype = torch.promote_types(x.dtype, reference.dtype)
    mse = (x.to(dtype) - reference.to(dtype)).square().reshape(x.shape[0], -1).mean(1)
    # log10(R^2) - log10(0) = +inf, the limit for a perfect estimate, without a division warning.
    return 10 * (2 * math.log10(data_range) - torch.log10(mse))


def _gaussian_window(window: int, sigma: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The normalised 1-d Gaussian taps ``exp(-t^2 / (2 sigma^2))``, ``t = -r..r``, shape ``(window,)``."""
    radius = (window - 1) // 2
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    taps = torch.exp(-0.5 * (t / sigma) ** 2)
    return (taps / taps.sum()).to(dtype=dtype, device=device)


def ssim(
    x: Tensor,
    reference: Tensor,
    data_range: float = 2.0,
    *,
    window: int = 11,
    sigma: float = 1.5,
) -> Tensor:
    r"""The mean structural similarity of every image, with a Gaussian window.

    The default window, 11 taps of a Gaussian of standard deviation 1.5, is Wang et al.'s, and
    with it the result equals scikit-image's
    ``structural_similarity(x, reference, data_range=R, gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, channel_axis=0)`` for each image: the local moments are filtered
    only where the window fits inside the image (a "valid" convolution), exactly the pixels
    scikit-image keeps after cropping its border. Another ``window`` truncates the Gaussian at
    radius ``(window - 1) // 2`` and renormalises it (smaller images, e.g. 8x8 digits, need one of
    at most their side).

    Arguments:
        x: Estimates, shape ``(B, C, H, W)``, real; float64 for results to float64 precision.
        reference: The ground truth, shape ``(B, C, H, W)``.
        data_range: :math:`R`, the width of the data's range (2 for :math:`[-1, 1]`).
        window: The odd window size, at most ``min(H, W)``.
        sigma: The Gaussian's standard deviation, in pixels.

    Returns:
        Shape ``(B,)``, in the dtype of ``x``; 1 where an image equals its reference.

    Raises:
        ValueError: For mismatched or non-image shapes, non-finite values, a non-positive range,
            an even window or a window larger than the images.
    """
    _check_pair(x, reference, data_range)
    if x.ndim != 4:
        raise ValueError(f"ssim takes images of shape (B, C, H, W), got {tuple(x.shape)}")
    if isinstance(window, bool) or not isinstance(window, int) or window < 1 or window % 2 == 0:
        raise ValueError(f"window must be a positive odd integer, got {window!r}")
    if window > min(x.shape[-2:]):
        raise ValueError(f"window {window} exceeds the images' size {tuple(x.shape[-2:])}: pass a smaller odd window")
    if not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma must be a positive finite number, got {sigma!r}")

    B, C, H, W = x.shape
    dtype = torch.promote_types(x.dtype, reference.dtype)
    a = x.to(dtype).reshape(B * C, 1, H, W)
    b = reference.to(dtype).reshape(B * C, 1, H, W)
    # The five local moments as channels of one depthwise, separable, valid convolution.
    moments = torch.cat([a, b, a * a, b * b, a * b], dim=1)
    taps = _gaussian_window(window, sigma, dtype, x.device)
    moments = F.conv2d(moments, taps.reshape(1, 1, 1, window).expand(5, 1, 1, window), groups=5)
    moments = F.conv2d(moments, taps.reshape(1, 1, window, 1).expand(5, 1, window, 1), groups=5)
    mu_a, mu_b, aa, bb, ab = moments.unbind(1)
    var_a = aa - mu_a * mu_a
    var_b = bb - mu_b * mu_b
    cov = ab - mu_a * mu_b
    c1 = (0.01 * data_range) ** 2
    c2 = (0.03 * data_range) ** 2
    index = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return index.reshape(B, -1).mean(1)
