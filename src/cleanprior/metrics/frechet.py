r"""Fréchet distances between sample sets, in the feature space of a network.

The Fréchet (2-Wasserstein) distance between two Gaussians is

.. math::
    d^2\big(\mathcal{N}(\mu_1, C_1), \mathcal{N}(\mu_2, C_2)\big)
    = \|\mu_1 - \mu_2\|^2 + \operatorname{tr} C_1 + \operatorname{tr} C_2
      - 2 \operatorname{tr} \big(C_1^{1/2} C_2 C_1^{1/2}\big)^{1/2},

and the FID of two image sets is this distance between Gaussians fitted to their features. The
square roots are taken by eigendecomposition of symmetric positive semi-definite matrices, so
rank-deficient covariances (fewer samples than features) are handled exactly.

Two feature spaces:

- :func:`frechet_distance_features` uses a :class:`FeatureNetwork`, a small CNN trained once on the
  clean training split of an embedded dataset (a classifier where the dataset has labels, the
  encoder of a denoising autoencoder where it has none) and cached on disk. It works offline, on
  8x8 digits as on 28x28 MNIST, but its numbers are *not* comparable with Inception FID numbers
  from the literature, nor between two feature networks.
- :func:`inception_fid` is the standard FID with the TensorFlow Inception-v3 weights of the
  ``pytorch-fid`` package, when that package and its weights are available locally.

Both are biased upwards by the finite sample sizes (the bias shrinks like :math:`1 / N`), so
compare sets of equal sizes only.

References:
    Fréchet (1957). Sur la distance de deux lois de probabilité.
    Dowson & Landau (1982). The Fréchet distance between multivariate normal distributions.
    Heusel et al. (2017). GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash
    Equilibrium (FID). https://arxiv.org/abs/1706.08500
    Seitzer (2020). pytorch-fid: FID Score for PyTorch. https://github.com/mseitzer/pytorch-fid
"""

from __future__ import annotations

import inspect
import math
import os
import pathlib
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cleanprior.runs.atomic import atomic_path

__all__ = [
    "FeatureNetwork",
    "feature_network",
    "frechet_distance",
    "frechet_distance_features",
    "frechet_features",
    "inception_fid",
]

FEATURE_NETWORK_VERSION = 1
"""Part of every cached network's file name: bump it when the architecture or training changes."""

_FORMAT = "cleanprior.feature_network"
_DENOISING_STD = 0.3


def _as_float64(name: str, value: Any) -> Tensor:
    value = torch.as_tensor(value)
    if value.is_complex() or value.dtype == torch.bool:
        raise ValueError(f"{name} must hold real numbers, got {value.dtype}")
    value = value.to(torch.float64)
    if not torch.isfinite(value).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return value


def _round_off(eigvals: Tensor) -> Tensor:
    """The eigenvalues of a PSD matrix with those at round-off level, d eps max|lambda|, set to 0.

    An exact zero computed in float64 comes out as about +-eps * max|lambda|, and its square root,
    about 1e-8 * sqrt(max|lambda|), would bias a rank-deficient distance by as much.
    """
    tolerance = eigvals.shape[-1] * torch.finfo(eigvals.dtype).eps * eigvals.abs().max()
    return torch.where(eigvals > tolerance, eigvals, torch.zeros_like(eigvals))


def _psd_root(name: str, cov: Tensor) -> tuple[Tensor, Tensor]:
    """The symmetric square root of a covariance and its eigenvalues, shapes ``(d, d)`` and ``(d,)``."""
    eigvals, eigvecs = torch.linalg.eigh(0.5 * (cov + cov.mT))
    scale = eigvals.abs().max().clamp_min(torch.finfo(torch.float64).tiny)
    # Round-off leaves eigenvalues of a PSD matrix a few ulps below 0; clearly negative ones mean
    # the input is not a covariance.
    if eigvals.min() < -1e-8 * scale:
        raise ValueError(f"{name} must be positive semi-definite (smallest eigenvalue {eigvals.min().item():.3g})")
    eigvals = _round_off(eigvals)
    return (eigvecs * eigvals.sqrt()) @ eigvecs.mT, eigvals


def frechet_distance(mu1: Tensor, cov1: Tensor, mu2: Tensor, cov2: Tensor) -> float:
    r"""The squared Fréchet distance between :math:`\mathcal{N}(\mu_1, C_1)` and :math:`\mathcal{N}(\mu_2, C_2)`.

    Computed in float64 as above, with :math:`\operatorname{tr} (C_1^{1/2} C_2 C_1^{1/2})^{1/2}`
    the sum of the square roots of the eigenvalues of the symmetric positive semi-definite
    matrix :math:`C_1^{1/2} C_2 C_1^{1/2}` (equal to :math:`\operatorname{tr} (C_1 C_2)^{1/2}`, whose
    matrix is not symmetric), so singular covariances need no regularisation: eigenvalues at
    round-off level (:math:`d \varepsilon \lambda_{\max}`) count as zeros. Negative round-off in
    the result is clipped at 0.

    Arguments:
        mu1: Mean, shape ``(d,)``.
        cov1: Covariance, shape ``(d, d)``, symmetric positive semi-definite.
        mu2: Mean, shape ``(d,)``.
        cov2: Covariance, shape ``(d, d)``, symmetric positive semi-definite.

    Returns:
        :math:`d^2 \geq 0`.

    Raises:
        ValueError: For mismatched shapes, non-finite entries or a covariance with a clearly
            negative eigenvalue.
    """
    mu1, cov1, mu2, cov2 = (_as_float64(n, v) for n, v in (("mu1", mu1), ("cov1", cov1), ("mu2", mu2), ("cov2", cov2)))
    if mu1.ndim != 1:
        raise ValueError(f"mu1 must have shape (d,), got {tuple(mu1.shape)}")
    d = mu1.shape[0]
    if mu2.shape != (d,):
        raise ValueError(f"mu2 must have shape ({d},) like mu1, got {tuple(mu2.shape)}")
    for name, cov in (("cov1", cov1), ("cov2", cov2)):
        if cov.shape != (d, d):
            raise ValueError(f"{name} must have shape ({d}, {d}), got {tuple(cov.shape)}")
    cov2 = cov2.to(cov1.device)
    root1, eigvals1 = _psd_root("cov1", cov1)
    _, eigvals2 = _psd_root("cov2", cov2)
    middle = root1 @ cov2 @ root1
    cross = _round_off(torch.linalg.eigvalsh(0.5 * (middle + middle.mT))).sqrt().sum()
    mean_term = (mu1 - mu2.to(mu1.device)).square().sum()
    distance = mean_term + eigvals1.sum() + eigvals2.sum() - 2 * cross
    return max(distance.item(), 0.0)


class FeatureNetwork(nn.Module):
    r"""A small CNN whose penultimate activations are the features of a Fréchet distance.

    The trunk, three 3x3 convolutions (the last two of stride 2) with SiLU activations, an
    adaptive average pooling to at most 4x4 and a linear layer, maps an image ``(C, H, W)`` to
    ``dimension`` features :math:`\phi(x)` (after a SiLU). The head on top of them is

    - a linear classifier into ``classes`` logits (trained with the cross-entropy) when
      ``classes`` is given: the features then separate what tells the classes apart, as
      Inception's do for ImageNet;
    - otherwise a two-layer decoder back to the image: the trunk is then the encoder of a
      denoising autoencoder, trained to map :math:`x + 0.3 n` to :math:`x` (for unlabelled
      data, such as the faces), whose features summarise what the image is made of.

    Arguments:
        channels: :math:`C`.
        size: :math:`(H, W)`, the size of the images it takes.
        classes: The number of classes, or None for the autoencoder.
        dimension: The number of features.
        width: The channels of the first convolution (twice as many in the next two).
        generator: The source of the initial weights (a CPU generator, as the weights are
            initialised before any move to another device).
    """

    def __init__(
        self,
        channels: int,
        size: tuple[int, int] | list[int],
        *,
        classes: int | None = None,
        dimension: int = 64,
        width: int = 16,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        size = tuple(int(s) for s in size)
        for name, value in (("channels", channels), ("dimension", dimension), ("width", width)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if len(size) != 2 or min(size) < 1:
            raise ValueError(f"size must be (H, W) with positive sides, got {size}")
        if classes is not None and (isinstance(classes, bool) or not isinstance(classes, int) or classes < 2):
            raise ValueError(f"classes must be an integer of at least 2, or None for an autoencoder, got {classes!r}")
        self.channels, self.size, self.classes = channels, size, classes
        self.dimension, self.width = dimension, width
        # The two stride-2 convolutions leave ceil(n / 4) pixels a side; pooling to 4x4 keeps the
        # coarse layout (a point and a half of MNIST accuracy over 2x2) without upsampling the
        # 2x2 maps of 8x8 digits.
        pool = tuple(min(4, (n + 3) // 4) for n in size)
        self.trunk = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
            nn.SiLU(),
            nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1),
            nn.SiLU(),
            nn.AdaptiveAvgPool2d(pool),
            nn.Flatten(),
            nn.Linear(2 * width * pool[0] * pool[1], dimension),
            nn.SiLU(),
        )
        if classes is None:
            self.head = nn.Sequential(
                nn.Linear(dimension, 4 * dimension),
                nn.SiLU(),
                nn.Linear(4 * dimension, channels * size[0] * size[1]),
            )
        else:
            self.head = nn.Linear(dimension, classes)
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                # PyTorch's default initialisation, drawn from the given generator.
                nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5), generator=generator)
                bound = 1 / math.sqrt(module.weight[0].numel())
                nn.init.uniform_(module.bias, -bound, bound, generator=generator)
        self.metrics: dict[str, float] = {}

    @property
    def kind(self) -> str:
        """``"classifier"`` or ``"autoencoder"``, after the head."""
        return "autoencoder" if self.classes is None else "classifier"

    def config(self) -> dict[str, Any]:
        """The arguments that rebuild the architecture: ``FeatureNetwork(**config())``."""
        return {
            "channels": self.channels,
            "size": list(self.size),
            "classes": self.classes,
            "dimension": self.dimension,
            "width": self.width,
        }

    def check_images(self, x: Tensor, name: str = "x") -> None:
        """Raise ValueError naming ``name`` unless ``x`` is a finite batch ``(N, C, H, W)`` this network takes."""
        expected = (self.channels, *self.size)
        if not isinstance(x, Tensor) or x.ndim != 4 or tuple(x.shape[1:]) != expected:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(
                f"{name} must be images of shape (N, {', '.join(map(str, expected))}) for this feature network, "
                f"got {shape}"
            )
        if x.is_complex() or not x.is_floating_point() or not torch.isfinite(x).all():
            raise ValueError(f"{name} must be real, floating-point and finite")

    def features(self, x: Tensor) -> Tensor:
        r"""The features :math:`\phi(x)`.

        Arguments:
            x: Images, shape ``(N, C, H, W)``, in the range the network was trained on.

        Returns:
            Shape ``(N, dimension)``.
        """
        return self.trunk(x)

    def forward(self, x: Tensor) -> Tensor:
        """The head's output: logits ``(N, classes)`` or the denoised images ``(N, C, H, W)``."""
        out = self.head(self.trunk(x))
        return out if self.classes is not None else out.reshape(x.shape)


def _cache_path(dataset: str, steps: int, batch_size: int, cache_dir: str | os.PathLike[str] | None) -> pathlib.Path:
    if cache_dir is None:
        cache_dir = os.environ.get("CLEANPRIOR_CACHE") or pathlib.Path.home() / ".cache" / "cleanprior"
    name = f"feature-network-{dataset}-v{FEATURE_NETWORK_VERSION}-steps{steps}-batch{batch_size}.pt"
    return pathlib.Path(cache_dir).expanduser() / name


def _load_cached(path: pathlib.Path, dataset: str, device: torch.device) -> FeatureNetwork | None:
    """The cached network, or None (with a warning when the file exists but cannot be used)."""
    if not path.is_file():
        return None
    try:
        payload = torch.load(path, map_location=device, weights_only=True)
        if not isinstance(payload, dict) or payload.get("format") != _FORMAT:
            raise ValueError("not a cleanprior feature network")
        if payload.get("version") != FEATURE_NETWORK_VERSION or payload.get("dataset") != dataset:
            raise ValueError(f"version {payload.get('version')!r} of dataset {payload.get('dataset')!r}")
        network = FeatureNetwork(**payload["config"])
        network.load_state_dict(payload["state_dict"])
        network.metrics = {str(k): float(v) for k, v in payload["metrics"].items()}
    except Exception as error:  # a damaged file fails in many ways (unpickling, keys, shapes)
        warnings.warn(
            f"the cached feature network {path} is unusable ({type(error).__name__}: {error}); retraining it",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    return network.to(device)


def _save(path: pathlib.Path, dataset: str, network: FeatureNetwork) -> None:
    """Write the network's weights atomically: a temporary file in the same folder, then a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": _FORMAT,
        "version": FEATURE_NETWORK_VERSION,
        "dataset": dataset,
        "config": network.config(),
        "state_dict": {k: v.detach().cpu() for k, v in network.state_dict().items()},
        "metrics": dict(network.metrics),
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def _train(
    network: FeatureNetwork,
    images: Tensor,
    labels: Tensor | None,
    *,
    steps: int,
    batch_size: int,
    generator: torch.Generator | None,
) -> None:
    """Fit the network by Adam with a cosine learning-rate decay, on minibatches drawn with replacement."""
    device = next(network.parameters()).device
    optimizer = torch.optim.Adam(network.parameters(), lr=3e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    network.train()
    for _ in range(steps):
        index = torch.randint(images.shape[0], (min(batch_size, images.shape[0]),), generator=generator)
        x = images[index].to(device)
        if labels is None:
            noise = torch.randn(x.shape, generator=generator).to(device)
            loss = F.mse_loss(network(x + _DENOISING_STD * noise), x)
        else:
            loss = F.cross_entropy(network(x), labels[index].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    network.eval()


@torch.no_grad()
def _evaluate(
    network: FeatureNetwork, images: Tensor, labels: Tensor | None, generator: torch.Generator | None
) -> dict[str, float]:
    """Held-out scores: the test accuracy of a classifier, the test denoising MSE of an autoencoder."""
    device = next(network.parameters()).device
    x = images.to(device)
    if labels is not None:
        return {"test_accuracy": (network(x).argmax(1).cpu() == labels).double().mean().item()}
    noise = torch.randn(x.shape, generator=generator).to(device)
    return {"test_denoising_mse": F.mse_loss(network(x + _DENOISING_STD * noise), x).item()}


def _dataset_split(dataset: str, split: str) -> tuple[Tensor, Tensor | None]:
    """Images ``(N, C, H, W)`` of a registered dataset, with labels ``(N,)`` where it has them."""
    from cleanprior.data import DATASETS

    loader = DATASETS[dataset]
    if "labels" in inspect.signature(loader).parameters:
        images, labels = loader(split, labels=True)
    else:
        images, labels = loader(split), None
    if images.ndim != 4:
        raise ValueError(
            f"dataset {dataset!r} does not hold images (N, C, H, W): its samples have shape {tuple(images.shape[1:])}"
        )
    return images.float(), labels


def feature_network(
    dataset: str,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    device: torch.device | str = "cpu",
    steps: int = 600,
    batch_size: int = 128,
    generator: torch.Generator | None = None,
) -> FeatureNetwork:
    r"""The feature network of an embedded dataset, trained on its clean training split once and cached.

    A dataset with labels (``mnist5k``, ``digits``) gets a classifier, one without (``faces``) a
    denoising autoencoder (see :class:`FeatureNetwork`). The weights are kept in ``cache_dir``
    as ``feature-network-<dataset>-v<version>-steps<steps>-batch<batch_size>.pt`` (the training
    budget is in the name, so a quick test network never stands in for the default one),
    written atomically; later calls load them instead of training. A cache file that cannot be
    read is retrained and overwritten, with a warning. The held-out score of the training
    (``test_accuracy`` or ``test_denoising_mse`` on the test split) is in ``network.metrics``.

    The default budget trains the ``mnist5k`` classifier in about a minute on two CPU cores.

    Arguments:
        dataset: A name of :data:`cleanprior.data.DATASETS` holding images.
        cache_dir: Where the weights are kept; by default ``$CLEANPRIOR_CACHE``, else
            ``~/.cache/cleanprior``.
        device: Where the network trains and is returned.
        steps: Adam steps of the training.
        batch_size: Images per step.
        generator: A CPU generator, the source of the initial weights, the minibatches and the
            denoising noise (used only when the network is trained, not when it is loaded).

    Returns:
        The network, in evaluation mode, without gradients, on ``device``.

    Raises:
        ValueError: For an unknown dataset, a dataset of non-images, a non-positive budget or a
            generator that is not on the CPU.
    """
    from cleanprior.data import DATASETS

    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; known datasets: {', '.join(sorted(DATASETS))}")
    for name, value in (("steps", steps), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if generator is not None and generator.device.type != "cpu":
        raise ValueError(f"generator must be a CPU generator (the data are drawn on the CPU), got one on {generator.device}")
    device = torch.device(device)
    path = _cache_path(dataset, steps, batch_size, cache_dir)

    network = _load_cached(path, dataset, device)
    if network is None:
        images, labels = _dataset_split(dataset, "train")
        classes = None if labels is None else int(labels.max()) + 1
        network = FeatureNetwork(images.shape[1], images.shape[2:], classes=classes, generator=generator).to(device)
        _train(network, images, labels, steps=steps, batch_size=batch_size, generator=generator)
        network.metrics = _evaluate(network, *_dataset_split(dataset, "test"), generator)
        _save(path, dataset, network)
    return network.eval().requires_grad_(False)


@torch.no_grad()
def frechet_features(x: Tensor, network: FeatureNetwork, batch_size: int = 256) -> Tensor:
    r"""The features :math:`\phi(x)` of a set of images, computed in batches.

    Arguments:
        x: Images, shape ``(N, C, H, W)``, the network's input shape.
        network: The feature network.
        batch_size: Images per forward pass.

    Returns:
        Shape ``(N, k)``, float32, on ``x``'s device.

    Raises:
        ValueError: For images of the wrong shape or with non-finite values, or a
            non-positive batch size.
    """
    network.check_images(x)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    parameter = next(network.parameters())
    chunks = [network.features(chunk.to(parameter)).to(x.device) for chunk in x.split(batch_size)]
    return torch.cat(chunks).float()


def _moments(features: Tensor) -> tuple[Tensor, Tensor]:
    """The mean ``(k,)`` and the unbiased covariance ``(k, k)`` of features ``(N, k)``, in float64."""
    features = features.double()
    mean = features.mean(0)
    centred = features - mean
    return mean, centred.mT @ centred / (features.shape[0] - 1)


def frechet_distance_features(
    samples: Tensor,
    reference: Tensor,
    network: FeatureNetwork,
    *,
    batch_size: int = 256,
) -> float:
    r"""The Fréchet distance between two image sets in the feature space of a :class:`FeatureNetwork`.

    :func:`frechet_distance` between the Gaussians with the means and (unbiased) covariances of
    :math:`\phi(\text{samples})` and :math:`\phi(\text{reference})`. It ranks priors trained on the
    same dataset; it is NOT comparable with Inception FID numbers, nor across feature networks
    (another dataset, budget or version), and it grows as the sets shrink.

    Arguments:
        samples: Images, shape ``(N, C, H, W)``, :math:`N \geq 2`.
        reference: Images, shape ``(M, C, H, W)``, :math:`M \geq 2` (e.g. the test split).
        network: The feature network of the dataset (:func:`feature_network`).
        batch_size: Images per forward pass.

    Returns:
        The squared distance, :math:`\geq 0`.

    Raises:
        ValueError: For images the network does not take or sets of fewer than 2 images.
    """
    network.check_images(samples, "samples")
    network.check_images(reference, "reference")
    for name, x in (("samples", samples), ("reference", reference)):
        if x.shape[0] < 2:
            raise ValueError(f"{name} must hold at least 2 images to estimate a covariance, got {x.shape[0]}")
    mu1, cov1 = _moments(frechet_features(samples, network, batch_size))
    mu2, cov2 = _moments(frechet_features(reference, network, batch_size))
    return frechet_distance(mu1, cov1, mu2, cov2)


def _check_inception_images(name: str, x: Tensor) -> None:
    if not isinstance(x, Tensor) or x.ndim != 4 or x.shape[1] not in (1, 3):
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name} must be images of shape (N, 1 or 3, H, W), got {shape}")
    if x.shape[0] < 2:
        raise ValueError(f"{name} must hold at least 2 images to estimate a covariance, got {x.shape[0]}")
    if x.is_complex() or not x.is_floating_point() or not torch.isfinite(x).all():
        raise ValueError(f"{name} must be real, floating-point and finite")


def _inception(device: torch.device) -> nn.Module:
    """pytorch-fid's InceptionV3 up to its 2048-dimensional pool features, from local files only."""
    try:
        from pytorch_fid.inception import FID_WEIGHTS_URL, InceptionV3
    except ImportError as error:
        raise RuntimeError(
            "inception_fid needs the pytorch-fid package (with torchvision) and its Inception weights: "
            "install it with `pip install pytorch-fid`, or use frechet_distance_features, which works offline"
        ) from error
    weights = pathlib.Path(torch.hub.get_dir()) / "checkpoints" / FID_WEIGHTS_URL.rsplit("/", 1)[-1]
    if not weights.is_file():
        raise RuntimeError(
            f"the FID Inception weights are not at {weights}, and cleanprior does not download them: "
            f"fetch {FID_WEIGHTS_URL} into that folder (or set TORCH_HOME to a folder whose "
            "hub/checkpoints holds it), e.g. by running `python -c \"from pytorch_fid.inception import "
            "InceptionV3; InceptionV3()\"` once on a machine with internet access"
        )
    return InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).to(device).eval()


@torch.no_grad()
def inception_fid(
    samples: Tensor,
    reference: Tensor,
    *,
    batch_size: int = 50,
    device: torch.device | str | None = None,
) -> float:
    r"""The standard FID: the Fréchet distance of the 2048 pool features of the FID Inception-v3.

    Images in :math:`[-1, 1]` are mapped to :math:`[0, 1]`, grey images repeated over three
    channels, and pytorch-fid's network resizes them to 299x299 bilinearly. Small images
    (8x8 digits) give numbers of little meaning: prefer :func:`frechet_distance_features` there.

    Arguments:
        samples: Images, shape ``(N, 1 or 3, H, W)``, in :math:`[-1, 1]`, :math:`N \geq 2`.
        reference: Images, shape ``(M, 1 or 3, H, W)``, in :math:`[-1, 1]`, :math:`M \geq 2`.
        batch_size: Images per forward pass.
        device: Where the network runs (default: that of ``samples``).

    Returns:
        The FID, :math:`\geq 0`.

    Raises:
        ValueError: For images of the wrong shape or with non-finite values.
        RuntimeError: If pytorch-fid or its weights are not available locally; the message says
            how to make them available. Nothing is downloaded.
    """
    _check_inception_images("samples", samples)
    _check_inception_images("reference", reference)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    device = torch.device(device) if device is not None else samples.device
    network = _inception(device)

    def features(x: Tensor) -> Tensor:
        chunks = []
        for chunk in x.split(batch_size):
            chunk = ((chunk.to(device, torch.float32) + 1) / 2).clamp(0, 1).expand(-1, 3, -1, -1)
            chunks.append(network(chunk)[0].flatten(1).cpu())
        return torch.cat(chunks)

    mu1, cov1 = _moments(features(samples))
    mu2, cov2 = _moments(features(reference))
    return frechet_distance(mu1, cov1, mu2, cov2)
