r"""The Gaussian start of DiEM: a Gaussian prior fitted to linear observations by closed-form EM.

The model: a signal :math:`x \sim \mathcal{N}(\mu, \Sigma)` in :math:`\mathbb{R}^d` and
observations :math:`y_i = A_i x_i + n_i`, :math:`n_i \sim \mathcal{N}(0, \sigma_i^2 I)`, with
linear operators :math:`A_i` that may differ per observation. Everything about one observation
is Gaussian and exact, in the Kalman form, valid for a singular :math:`\Sigma`:

.. math::
    C_i = A_i \Sigma A_i^\top + \sigma_i^2 I, \quad
    K_i = \Sigma A_i^\top C_i^{-1}, \quad
    \mu_i = \mu + K_i (y_i - A_i \mu), \quad
    \Sigma_i = \Sigma - K_i A_i \Sigma, \quad
    p(y_i) = \mathcal{N}(y_i; A_i \mu, C_i),

which equals :math:`\Sigma_i = (\Sigma^{-1} + A_i^\top A_i / \sigma_i^2)^{-1}`,
:math:`\mu_i = \Sigma_i (\Sigma^{-1} \mu + A_i^\top y_i / \sigma_i^2)` where :math:`\Sigma` is
invertible. Expectation-maximization of :math:`\sum_i \log p(y_i)` alternates this E-step with
the closed-form M-step

.. math::
    \mu \leftarrow \frac{1}{N} \sum_i \mu_i, \qquad
    \Sigma \leftarrow \frac{1}{N} \sum_i \big(\Sigma_i + (\mu_i - \mu)(\mu_i - \mu)^\top\big),

and never decreases the evidence. For images (:math:`d` in the hundreds and more) neither
:math:`\Sigma_i` nor :math:`K_i` can be stored for every observation: the covariance is kept low
rank plus diagonal, :math:`\Sigma = U U^\top + \operatorname{diag}(D)`, and the E-step draws exact
posterior samples matrix-free by Matheron's rule (the perturbation trick),

.. math::
    x = x_0 + \Sigma A^\top (A \Sigma A^\top + \sigma^2 I)^{-1} (y - A x_0 - \sigma \epsilon),
    \qquad x_0 \sim \mathcal{N}(\mu, \Sigma), \ \epsilon \sim \mathcal{N}(0, I),

whose symmetric positive-definite system is solved by conjugate gradients; the M-step fits
:math:`\mu, U, D` to the samples by probabilistic PCA.

Complex measurements (MRI k-space of a real image) are read as real vectors of twice the length,
with circular noise :math:`\mathbb{E} |n_j|^2 = \sigma^2`, i.e. variance :math:`\sigma^2 / 2` on
each real and imaginary part, as :mod:`cleanprior.operators.noise` draws it; adjoints are those
of the real inner product, as every operator of the library takes them.

References:
    Rozet et al. (2024). Learning Diffusion Priors from Observations by Expectation Maximization
    (DiEM), section 4.1: the Gaussian initial prior fitted by EM. https://arxiv.org/abs/2405.13712
    Dempster, Laird & Rubin (1977). Maximum Likelihood from Incomplete Data via the EM Algorithm.
    Tipping & Bishop (1999). Probabilistic Principal Component Analysis. J. R. Stat. Soc. B 61(3).
    Halko, Martinsson & Tropp (2011). Finding Structure with Randomness. SIAM Review 53(2).
    Hoffman & Ribak (1991). Constrained Realizations of Gaussian Fields; Wilson et al. (2020).
    Efficiently Sampling Functions from Gaussian Process Posteriors (Matheron's rule).
    Wei & Tanner (1990). A Monte Carlo Implementation of the EM Algorithm.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from cleanprior.diffusion.denoiser import batch_sigma
from cleanprior.operators.base import Operator, as_operator, inner

__all__ = ["DENSE_LIMIT", "GaussianPrior", "fit_gaussian"]

DENSE_LIMIT = 256
"""The most features :math:`d` and real measurements :math:`m` per observation for which
:meth:`GaussianPrior.sample_posterior` builds the matrices :math:`A_i` (``method="auto"``)."""

_CG_FIRST_BLOCK = 16
"""Conjugate-gradient iterations before the first host-side convergence check; blocks double."""

_EIGH_LIMIT = 2048
"""Up to this many features the M-step's principal components come from an exact eigendecomposition."""


def _flat_real(y: Tensor) -> Tensor:
    """Measurements ``(B, *y_shape)`` as real vectors ``(B, m)`` (complex entries as two reals)."""
    return (torch.view_as_real(y) if y.is_complex() else y).reshape(y.shape[0], -1)


def _unflat_real(v: Tensor, like: Tensor) -> Tensor:
    """Real vectors ``(B, m)`` back to measurements of the shape and kind of ``like``."""
    if like.is_complex():
        return torch.view_as_complex(v.reshape(*like.shape, 2).contiguous())
    return v.reshape(like.shape)


def _noise_variance(noise_std: Tensor, y: Tensor) -> Tensor:
    r"""The noise variance of each real measurement, shape ``(B,)``: :math:`\sigma^2`, or
    :math:`\sigma^2 / 2` per real and imaginary part of circular complex noise."""
    return noise_std**2 / 2 if y.is_complex() else noise_std**2


def _column(value: Tensor, like: Tensor) -> Tensor:
    """Per-observation values ``(B,)`` shaped ``(B, 1, ..., 1)`` to multiply ``like``."""
    return value.reshape((-1,) + (1,) * (like.ndim - 1))


def _check_shape(shape: Sequence[int]) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in shape)
    except TypeError:
        raise ValueError(f"shape must be a sequence of positive integers, got {shape!r}") from None
    if not shape or any(s < 1 for s in shape):
        raise ValueError(f"shape must be a non-empty sequence of positive integers, got {shape}")
    return shape


def _check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _check_observations(
    A: Operator | Tensor | Callable[[Tensor], Tensor],
    y: Tensor,
    noise_std: float | Tensor,
    shape: tuple[int, ...],
    dtype: torch.dtype,
) -> tuple[Operator, Tensor, Tensor]:
    r"""Validate a batch of linear Gaussian observations before any work.

    Arguments:
        A: A linear operator, a dense matrix ``(m, d)`` or ``(B, m, d)``, or a callable declared
            linear with :func:`~cleanprior.operators.base.as_operator`.
        y: Observations, shape ``(B, *y_shape)``.
        noise_std: :math:`\sigma_y > 0`, a float or shape ``(B,)``.
        shape: The signal shape.
        dtype: The real working dtype.

    Returns:
        The operator, ``y`` in the working dtype (its complex counterpart for complex data) and
        the noise levels, shape ``(B,)``, in ``dtype``.

    Raises:
        TypeError: If the operator is not linear.
        ValueError: For non-finite or mis-shaped observations, noise levels or operators.
    """
    if not isinstance(y, Tensor) or y.ndim < 2:
        raise ValueError(
            f"the observations y must be a tensor of shape (B, *y_shape), got {getattr(y, 'shape', type(y).__name__)}"
        )
    if not (y.is_floating_point() or y.is_complex()):
        raise ValueError(f"the observations y must be floating-point or complex, got {y.dtype}")
    if not torch.isfinite(torch.view_as_real(y) if y.is_complex() else y).all():
        raise ValueError("the observations y contain NaN or infinite values")
    B = y.shape[0]
    noise_std = torch.as_tensor(noise_std, dtype=dtype, device=y.device)
    if noise_std.ndim > 1 or (noise_std.ndim == 1 and noise_std.shape[0] not in (1, B)):
        raise ValueError(
            f"noise_std must be a float or one value per observation ({B},), got shape {tuple(noise_std.shape)}"
        )
    if not (torch.isfinite(noise_std).all() and (noise_std > 0).all()):
        raise ValueError("noise_std must be positive and finite: the Gaussian likelihood needs noise")
    if isinstance(A, Tensor):
        from cleanprior.operators.matrix import Matrix

        A = Matrix(A, x_shape=shape)
    operator = as_operator(A)
    if not operator.linear:
        raise TypeError(
            "the Gaussian prior's posterior is exact for linear operators only: give a linear operator"
        )
    complex_dtype = torch.complex128 if dtype == torch.float64 else torch.complex64
    y = y.to(complex_dtype if y.is_complex() else dtype)
    probe = operator(torch.zeros(B, *shape, dtype=dtype, device=y.device))
    if probe.shape != y.shape or probe.is_complex() != y.is_complex():
        kind = "complex" if probe.is_complex() else "real"
        raise ValueError(
            f"the operator maps signals of shape (B, {', '.join(map(str, shape))}) to {kind} "
            f"measurements of shape {tuple(probe.shape)}, but y has shape {tuple(y.shape)} ({y.dtype})"
        )
    return operator, y, noise_std.expand(B)


def _operator_matrix(A: Operator, y: Tensor, shape: tuple[int, ...]) -> Tensor:
    r"""The matrices :math:`A_i`, shape ``(B, m, d)``, real (complex rows as two real rows).

    Built from the cheaper of :math:`d` products :math:`A e_j` (columns) and :math:`m` products
    :math:`A^\top e_k` (rows), each on the whole batch, in the dtype of ``y``'s real part.

    Arguments:
        A: The linear operator of the batch.
        y: Observations, shape ``(B, *y_shape)``, giving the batch, the measurement shape and kind.
        shape: The signal shape.
    """
    B, d = y.shape[0], math.prod(shape)
    dtype = y.real.dtype
    m = _flat_real(y).shape[1]
    if d <= m:
        eye = torch.eye(d, dtype=dtype, device=y.device)
        columns = [_flat_real(A(eye[j].reshape(1, *shape).expand(B, *shape))) for j in range(d)]
        return torch.stack(columns, dim=-1)
    eye = torch.eye(m, dtype=dtype, device=y.device)
    rows = [A.adjoint(_unflat_real(eye[k].expand(B, m), y)).reshape(B, d) for k in range(m)]
    return torch.stack(rows, dim=1)


class _Kalman(NamedTuple):
    r"""One batch of exact Gaussian observation terms, float64.

    Attributes:
        cholesky: :math:`L_i` with :math:`L_i L_i^\top = C_i`, shape ``(B, m, m)``.
        white: :math:`L_i^{-1} (y_i - A_i \mu)`, shape ``(B, m)``.
        gain: :math:`G_i = L_i^{-1} A_i \Sigma`, shape ``(B, m, d)``, so that
            :math:`K_i (y_i - A_i \mu) = G_i^\top \mathrm{white}_i` and
            :math:`K_i A_i \Sigma = G_i^\top G_i`; None when not asked for.
        log_evidence: :math:`\log \mathcal{N}(y_i; A_i \mu, C_i)`, shape ``(B,)``.
    """

    cholesky: Tensor
    white: Tensor
    gain: Tensor | None
    log_evidence: Tensor


def _kalman(
    mean: Tensor, M: Tensor, MS: Tensor, y: Tensor, noise_var: Tensor, *, gain: bool = True
) -> _Kalman:
    r"""The Kalman terms of observations :math:`y_i = M_i x + n_i`.

    Arguments:
        mean: :math:`\mu`, shape ``(d,)``.
        M: The matrices :math:`A_i`, shape ``(B, m, d)``.
        MS: :math:`A_i \Sigma`, shape ``(B, m, d)``.
        y: Flat real observations, shape ``(B, m)``.
        noise_var: The noise variance per real measurement, shape ``(B,)``.
        gain: Whether to compute the gain (:math:`O(B m^2 d)`, as much as the rest).
    """
    m = M.shape[1]
    C = MS @ M.mT + noise_var[:, None, None] * torch.eye(m, dtype=M.dtype, device=M.device)
    L = torch.linalg.cholesky(0.5 * (C + C.mT))
    r = y - M @ mean
    white = torch.linalg.solve_triangular(L, r[..., None], upper=False)[..., 0]
    G = torch.linalg.solve_triangular(L, MS, upper=False) if gain else None
    log_det = 2 * torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).sum(-1)
    log_evidence = -0.5 * ((white**2).sum(-1) + log_det + m * math.log(2 * math.pi))
    return _Kalman(L, white, G, log_evidence)


def _solve_spd(matvec: Callable[[Tensor], Tensor], b: Tensor, iterations: int, tol: float) -> Tensor:
    r"""Solve the SPD systems :math:`M_i u_i = b_i` by conjugate gradients to relative residual ``tol``.

    The batched solver runs every iteration it is given, so it is called in blocks of doubling
    length, each warm-started from the last (a restart costs one product and recomputes the true
    residual), until every residual meets the tolerance or ``iterations`` are spent (then a
    warning): at most about twice the products that a single run would need.

    Arguments:
        matvec: :math:`v \mapsto M v`, shape ``(B, *y_shape)``.
        b: Right-hand sides, shape ``(B, *y_shape)``.
        iterations: The most iterations in all.
        tol: The relative residual :math:`\|b_i - M_i u_i\| / \|b_i\|` to reach.

    Returns:
        :math:`u`, shape ``(B, *y_shape)``.
    """
    from cleanprior.posterior.linalg import cg

    norm = inner(b, b).sqrt()
    # the solver counts a residual at rounding level as converged, whatever the tolerance
    target = torch.clamp_min(tol * norm, 8 * torch.finfo(norm.dtype).eps * norm)
    u: Tensor | None = None
    done, block = 0, _CG_FIRST_BLOCK
    while done < iterations:
        block = min(block, iterations - done)
        result = cg(matvec, b, u, iterations=block, tol=tol)
        u, done, block = result.x, done + block, 2 * block
        converged = result.residual_norm <= target
        if bool(converged.all()):
            return u
    warnings.warn(
        f"conjugate gradients left {int((~converged).sum())} of {b.shape[0]} posterior samples above "
        f"the relative residual {tol:g} after {iterations} iterations; raise iterations",
        RuntimeWarning,
        stacklevel=3,
    )
    return u


class GaussianPrior(nn.Module):
    r"""A Gaussian prior :math:`\mathcal{N}(\mu, \Sigma)` on signals of any shape, with its exact
    denoiser, posterior and evidence.

    The covariance is dense, or low rank plus diagonal :math:`\Sigma = U U^\top +
    \operatorname{diag}(D)`, :math:`D > 0`. Parameters are buffers, so the prior moves with
    ``.to(device)`` and is saved with ``state_dict``. Signals ``(B, *shape)`` are flattened to
    :math:`d` features inside. Called as a module, it is the exact denoiser, a
    :class:`~cleanprior.diffusion.denoiser.Denoiser` for every sampler and guidance rule.

    Arguments:
        mean: :math:`\mu`, shape ``(d,)``.
        covariance: A dense :math:`\Sigma`, shape ``(d, d)``, symmetric positive semi-definite
            (symmetrised here); or None with ``factor`` and ``diagonal``.
        factor: :math:`U`, shape ``(d, r)``, for a low-rank plus diagonal covariance.
        diagonal: :math:`D`, shape ``(d,)``, positive.
        shape: The signal shape (``(d,)`` by default).

    Raises:
        ValueError: For a missing, mis-shaped, non-finite, indefinite or non-positive parameter.
    """

    def __init__(
        self,
        mean: Tensor,
        covariance: Tensor | None = None,
        *,
        factor: Tensor | None = None,
        diagonal: Tensor | None = None,
        shape: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        mean = torch.as_tensor(mean)
        if mean.ndim != 1:
            raise ValueError(f"mean must have shape (d,), got {tuple(mean.shape)}")
        d = mean.shape[0]
        if (covariance is None) == (factor is None and diagonal is None):
            raise ValueError("give either covariance, or factor and diagonal: exactly one of the two forms")
        if covariance is None and (factor is None or diagonal is None):
            raise ValueError("a low-rank plus diagonal covariance needs both factor and diagonal")
        self.shape = (d,) if shape is None else _check_shape(shape)
        if math.prod(self.shape) != d:
            raise ValueError(f"shape {self.shape} does not hold d={d} values")
        given = {"mean": mean}
        if covariance is not None:
            given["covariance"] = torch.as_tensor(covariance)
            if given["covariance"].shape != (d, d):
                raise ValueError(
                    f"covariance must have shape ({d}, {d}), got {tuple(given['covariance'].shape)}"
                )
        else:
            given["factor"] = torch.as_tensor(factor)
            given["diagonal"] = torch.as_tensor(diagonal)
            if given["factor"].ndim != 2 or given["factor"].shape[0] != d or given["factor"].shape[1] < 1:
                raise ValueError(
                    f"factor must have shape ({d}, r) with r >= 1, got {tuple(given['factor'].shape)}"
                )
            if given["diagonal"].shape != (d,):
                raise ValueError(f"diagonal must have shape ({d},), got {tuple(given['diagonal'].shape)}")
        dtype = torch.float32
        for name, tensor in given.items():
            if tensor.is_complex() or not torch.isfinite(tensor).all():
                raise ValueError(f"{name} must be real and finite")
            dtype = torch.promote_types(dtype, tensor.dtype)
        self.register_buffer("mean", mean.to(dtype))
        if covariance is not None:
            covariance = given["covariance"].to(dtype)
            symmetric = 0.5 * (covariance + covariance.mT)
            eigvals, eigvecs = torch.linalg.eigh(symmetric.double())
            if eigvals.min() < -1e-8 * eigvals.abs().max().clamp_min(1e-300):
                raise ValueError("covariance must be positive semi-definite")
            self.register_buffer("covariance", symmetric)
            self.register_buffer("eigvals", eigvals.clamp_min(0).to(dtype))
            self.register_buffer("eigvecs", eigvecs.to(dtype))
        else:
            if not (given["diagonal"] > 0).all():
                raise ValueError("diagonal must be positive")
            self.register_buffer("factor", given["factor"].to(dtype))
            self.register_buffer("diagonal", given["diagonal"].to(dtype))

    @classmethod
    def standard(
        cls,
        shape: Sequence[int],
        *,
        rank: int | None = None,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str | None = None,
    ) -> GaussianPrior:
        r"""The standard normal :math:`\mathcal{N}(0, I)`, dense or (with ``rank``) as
        :math:`U = 0`, :math:`D = 1`: EM's default start.

        Arguments:
            shape: The signal shape.
            rank: None for a dense covariance, else the rank :math:`r` of :math:`U`.
            dtype: The parameters' dtype.
            device: Where to put them.
        """
        shape = _check_shape(shape)
        d = math.prod(shape)
        mean = torch.zeros(d, dtype=dtype, device=device)
        if rank is None:
            return cls(mean, torch.eye(d, dtype=dtype, device=device), shape=shape)
        rank = _check_positive_int("rank", rank)
        if rank > d:
            raise ValueError(f"rank must be at most d={d}, got {rank}")
        factor = torch.zeros(d, rank, dtype=dtype, device=device)
        return cls(mean, factor=factor, diagonal=torch.ones(d, dtype=dtype, device=device), shape=shape)

    @property
    def features(self) -> int:
        """The dimension :math:`d`."""
        return self.mean.shape[0]

    @property
    def low_rank(self) -> bool:
        """Whether the covariance is low rank plus diagonal."""
        return hasattr(self, "factor")

    @property
    def rank(self) -> int | None:
        """The rank :math:`r` of :math:`U`, or None for a dense covariance."""
        return self.factor.shape[1] if self.low_rank else None

    def covariance_matrix(self) -> Tensor:
        r""":math:`\Sigma`, shape ``(d, d)`` (built from :math:`U` and :math:`D` when low rank)."""
        if self.low_rank:
            return self.factor @ self.factor.mT + torch.diag(self.diagonal)
        return self.covariance

    def _flatten(self, x: Tensor) -> Tensor:
        if tuple(x.shape[1:]) != self.shape or x.ndim < 2:
            raise ValueError(
                f"expected signals of shape (B, {', '.join(map(str, self.shape))}), got {tuple(x.shape)}"
            )
        return x.reshape(x.shape[0], self.features)

    def _cov_apply(self, v: Tensor) -> Tensor:
        r""":math:`\Sigma v` for flat vectors ``(B, d)``."""
        if self.low_rank:
            U = self.factor.to(v)
            return (v @ U) @ U.mT + v * self.diagonal.to(v)
        return v @ self.covariance.to(v)

    def _cov_rows(self, M: Tensor) -> Tensor:
        r""":math:`M \Sigma` for matrices ``(B, m, d)``, using the structure of :math:`\Sigma`."""
        if self.low_rank:
            U = self.factor.to(M)
            return (M @ U) @ U.mT + M * self.diagonal.to(M)
        return M @ self.covariance.to(M)

    def _woodbury(self, r: Tensor, shift: Tensor) -> tuple[Tensor, Tensor]:
        r""":math:`(\Sigma + s^2 I)^{-1} r` and :math:`\log \det (\Sigma + s^2 I)` for a low-rank :math:`\Sigma`.

        With :math:`E = \operatorname{diag}(D + s^2)` and the capacitance
        :math:`K = I + U^\top E^{-1} U` (Woodbury and the matrix determinant lemma),
        :math:`(E + U U^\top)^{-1} r = E^{-1} r - E^{-1} U K^{-1} U^\top E^{-1} r` and
        :math:`\log\det(E + U U^\top) = \log\det E + \log\det K`.

        Arguments:
            r: Flat vectors, shape ``(B, d)``.
            shift: :math:`s^2`, shape ``(B,)``.

        Returns:
            The solutions, shape ``(B, d)``, and the log-determinants, shape ``(B,)``.
        """
        U = self.factor.to(r)
        E = self.diagonal.to(r)[None] + shift[:, None]
        K = torch.einsum("dk,bd,dl->bkl", U, 1 / E, U) + torch.eye(U.shape[1], dtype=r.dtype, device=r.device)
        L = torch.linalg.cholesky(K)
        t = torch.cholesky_solve(((r / E) @ U)[..., None], L)[..., 0]
        u = (r - t @ U.mT) / E
        log_det = torch.log(E).sum(-1) + 2 * torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).sum(-1)
        return u, log_det

    def denoiser(self, x_t: Tensor, sigma: Tensor | float) -> Tensor:
        r"""The exact denoiser :math:`E[x \mid x_t] = \mu + \Sigma (\Sigma + \sigma^2 I)^{-1} (x_t - \mu)`.

        Dense: with :math:`\Sigma = Q \operatorname{diag}(\lambda) Q^\top` (decomposed once),
        :math:`\mu + Q \operatorname{diag}(\lambda / (\lambda + \sigma^2)) Q^\top (x_t - \mu)`.
        Low rank: Woodbury's identity, :math:`O(d r^2)` per sample. Differentiable.

        Arguments:
            x_t: Noisy signals, shape ``(B, *shape)``.
            sigma: Levels, a float or shape ``(B,)``.

        Returns:
            Shape ``(B, *shape)``, the dtype of ``x_t``.
        """
        x = self._flatten(x_t)
        sigma = batch_sigma(sigma, x)
        r = x - self.mean.to(x)
        if self.low_rank:
            u, _ = self._woodbury(r, sigma**2)
            return (self.mean.to(x) + self._cov_apply(u)).reshape(x_t.shape)
        Q, lam = self.eigvecs.to(x), self.eigvals.to(x)
        var = lam[None] + sigma[:, None] ** 2
        # at sigma = 0 a null direction keeps x_t: D(x, 0) = x
        shrink = torch.where(var > 0, lam / torch.where(var > 0, var, 1), 1)
        return (self.mean.to(x) + ((r @ Q) * shrink) @ Q.mT).reshape(x_t.shape)

    forward = denoiser

    def log_prob(self, x: Tensor) -> Tensor:
        r"""The log-density :math:`\log \mathcal{N}(x; \mu, \Sigma)`.

        Arguments:
            x: Signals, shape ``(B, *shape)``.

        Returns:
            Shape ``(B,)``.

        Raises:
            ValueError: If a dense covariance is singular (the density does not exist).
        """
        flat = self._flatten(x)
        r = flat - self.mean.to(flat)
        d = self.features
        if self.low_rank:
            u, log_det = self._woodbury(r, torch.zeros(flat.shape[0], dtype=flat.dtype, device=flat.device))
            quadratic = (r * u).sum(-1)
        else:
            lam = self.eigvals.to(flat)
            # eigenvalues at rounding level of the largest are zeros the decomposition blurred
            if not bool(lam.min() > d * torch.finfo(lam.dtype).eps * lam.max()):
                raise ValueError("log_prob needs a non-singular covariance; this one has a null direction")
            quadratic = ((r @ self.eigvecs.to(flat)) ** 2 / lam).sum(-1)
            log_det = torch.log(lam).sum()
        return -0.5 * (quadratic + log_det + d * math.log(2 * math.pi))

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        r"""Exact samples :math:`\mu + Q \operatorname{diag}(\sqrt{\lambda}) \epsilon` (dense) or
        :math:`\mu + U \epsilon_1 + \sqrt{D} \odot \epsilon_2` (low rank).

        Arguments:
            n: The number of samples.
            generator: The source of randomness (drawn on its device).

        Returns:
            Shape ``(n, *shape)``, on the prior's device and in its dtype.
        """
        n = _check_positive_int("n", n)
        device = generator.device if generator is not None else self.mean.device
        d = self.features
        width = d + (self.rank or 0)
        eps = torch.randn(n, width, generator=generator, dtype=self.mean.dtype, device=device).to(
            self.mean.device
        )
        if self.low_rank:
            x = self.mean + eps[:, d:] @ self.factor.mT + eps[:, :d] * self.diagonal.sqrt()
        else:
            x = self.mean + (eps * self.eigvals.sqrt()) @ self.eigvecs.mT
        return x.reshape(n, *self.shape)

    def _dense_terms(
        self, A: Operator, y: Tensor, noise_std: Tensor, *, gain: bool = True
    ) -> tuple[Tensor, _Kalman]:
        """The matrices ``(B, m, d)`` and the Kalman terms, float64, of float64 observations."""
        M = _operator_matrix(A, y, self.shape)
        noise_var = _noise_variance(noise_std, y)
        terms = _kalman(self.mean.double(), M, self._cov_rows(M), _flat_real(y), noise_var, gain=gain)
        return M, terms

    def posterior(
        self, A: Operator | Tensor | Callable[[Tensor], Tensor], y: Tensor, noise_std: float | Tensor
    ) -> tuple[Tensor, Tensor]:
        r"""The exact posterior :math:`\mathcal{N}(\mu_i, \Sigma_i)` of each observation, dense.

        :math:`\mu_i = \mu + K_i (y_i - A_i \mu)`, :math:`\Sigma_i = \Sigma - K_i A_i \Sigma`,
        computed in float64 from the matrices :math:`A_i` (``min(d, m)`` operator products on
        the batch, :math:`O(B (m^2 d + m d^2))` time and :math:`O(B d \max(m, d))` memory): for
        small :math:`d`.

        Arguments:
            A: A linear operator, or dense matrices ``(m, d)`` or ``(B, m, d)``.
            y: Observations, shape ``(B, *y_shape)``.
            noise_std: :math:`\sigma_y > 0`, a float or shape ``(B,)``.

        Returns:
            The means, shape ``(B, *shape)``, and covariances, shape ``(B, d, d)``, in the
            prior's dtype.
        """
        A, y, noise_std = _check_observations(A, y, noise_std, self.shape, torch.float64)
        _, terms = self._dense_terms(A, y, noise_std)
        means = self.mean.double() + (terms.gain.mT @ terms.white[..., None])[..., 0]
        covariances = self.covariance_matrix().double() - terms.gain.mT @ terms.gain
        covariances = 0.5 * (covariances + covariances.mT)
        dtype = self.mean.dtype
        return means.to(dtype).reshape(-1, *self.shape), covariances.to(dtype)

    def log_evidence(
        self, A: Operator | Tensor | Callable[[Tensor], Tensor], y: Tensor, noise_std: float | Tensor
    ) -> Tensor:
        r"""The exact log-evidence :math:`\log \mathcal{N}(y_i; A_i \mu, A_i \Sigma A_i^\top + \sigma_i^2 I)`.

        The held-out evidence of the Gaussian start, EM's diagnostic. The :math:`m \times m`
        covariance of every observation is built from the matrices :math:`A_i` (``min(d, m)``
        operator products on the batch; :math:`A_i \Sigma A_i^\top` as
        :math:`(A_i U)(A_i U)^\top + A_i \operatorname{diag}(D) A_i^\top` when low rank), then
        factored by Cholesky: :math:`O(B (m^2 d + m^3))` time and :math:`O(B m \max(m, d))`
        memory in float64, fine for :math:`m` up to a few hundred.

        Arguments:
            A: A linear operator, or dense matrices ``(m, d)`` or ``(B, m, d)``.
            y: Observations, shape ``(B, *y_shape)``; complex ones count as :math:`2m` reals.
            noise_std: :math:`\sigma_y > 0`, a float or shape ``(B,)``.

        Returns:
            Shape ``(B,)``, float64.
        """
        A, y, noise_std = _check_observations(A, y, noise_std, self.shape, torch.float64)
        return self._dense_terms(A, y, noise_std, gain=False)[1].log_evidence

    def sample_posterior(
        self,
        A: Operator | Tensor | Callable[[Tensor], Tensor],
        y: Tensor,
        noise_std: float | Tensor,
        generator: torch.Generator | None = None,
        *,
        method: str = "auto",
        iterations: int = 256,
        tol: float = 1e-6,
    ) -> Tensor:
        r"""One exact posterior sample per observation, by Matheron's rule.

        With :math:`x_0 \sim \mathcal{N}(\mu, \Sigma)` and noise :math:`n \sim \mathcal{N}(0,
        \sigma^2 I)` drawn in that order,
        :math:`x = x_0 + \Sigma A^\top (A \Sigma A^\top + \sigma^2 I)^{-1} (y - A x_0 - n)`
        has the law :math:`\mathcal{N}(\mu_i, \Sigma_i)`. Two ways to apply the inverse, which
        give the same sample from the same draws:

        - ``"dense"``: the matrices :math:`A_i` and a Cholesky factor, in float64 (the cost of
          :meth:`posterior`);
        - ``"cg"``: matrix-free, conjugate gradients on the symmetric positive-definite
          :math:`A \Sigma A^\top + \sigma^2 I` with products by the operator, in the prior's
          dtype, until the relative residual :math:`\|r_i\| / \|b_i\|` is at most ``tol`` (a
          warning if ``iterations`` do not suffice). The sample's error is then
          :math:`\Sigma A^\top (A \Sigma A^\top + \sigma^2 I)^{-1} r`, at most
          :math:`\|\Sigma A^\top\| \, \mathrm{tol} \, \|b\| / \sigma^2`.

        ``"auto"`` is ``"dense"`` for a dense covariance when both :math:`d` and the number
        :math:`m` of real measurements are at most :data:`DENSE_LIMIT`, else ``"cg"``: a low-rank
        covariance makes the products cheap and clusters the spectrum of the system (the
        diagonal's values and :math:`r` outliers), so that conjugate gradients beat the
        :math:`O(B m^2 d)` of the dense path at any size.

        Arguments:
            A: A linear operator, or dense matrices ``(m, d)`` or ``(B, m, d)``.
            y: Observations, shape ``(B, *y_shape)``.
            noise_std: :math:`\sigma_y > 0`, a float or shape ``(B,)``.
            generator: The source of randomness.
            method: ``"auto"``, ``"dense"`` or ``"cg"``.
            iterations: The most conjugate-gradient iterations (``"cg"``).
            tol: The relative residual that conjugate gradients reach (``"cg"``).

        Returns:
            Samples, shape ``(B, *shape)``, in the prior's dtype.
        """
        if method not in ("auto", "dense", "cg"):
            raise ValueError(f"method must be 'auto', 'dense' or 'cg', got {method!r}")
        iterations = _check_positive_int("iterations", iterations)
        if not tol > 0:
            raise ValueError(f"tol must be positive, got {tol!r}")
        dtype = self.mean.dtype
        A, y, noise_std = _check_observations(A, y, noise_std, self.shape, dtype)
        B = y.shape[0]
        if method == "auto":
            small = self.features <= DENSE_LIMIT and _flat_real(y).shape[1] <= DENSE_LIMIT
            method = "dense" if small and not self.low_rank else "cg"
        x0 = self.sample(B, generator)
        device = generator.device if generator is not None else y.device
        n = torch.randn(y.shape, generator=generator, dtype=y.dtype, device=device).to(y.device)
        n = n * _column(noise_std, n)
        if method == "dense":
            wide = y.to(torch.complex128 if y.is_complex() else torch.float64)
            M, terms = self._dense_terms(A, wide, noise_std.double())
            x0_flat = x0.reshape(B, -1).double()
            b = _flat_real(wide - n.to(wide.dtype)) - (M @ x0_flat[..., None])[..., 0]
            white = torch.linalg.solve_triangular(terms.cholesky, b[..., None], upper=False)
            x = x0_flat + (terms.gain.mT @ white)[..., 0]
            return x.to(dtype).reshape(B, *self.shape)
        noise_var = _column(_noise_variance(noise_std, y), y)

        def matvec(v: Tensor) -> Tensor:
            return A(self._cov_apply(A.adjoint(v).reshape(B, -1)).reshape(B, *self.shape)) + noise_var * v

        u = _solve_spd(matvec, y - A(x0) - n, iterations, tol)
        return x0 + self._cov_apply(A.adjoint(u).reshape(B, -1)).reshape(B, *self.shape)

    def extra_repr(self) -> str:
        kind = f"rank={self.rank}" if self.low_rank else "dense"
        return f"features={self.features}, shape={self.shape}, {kind}"


def _top_components(X: Tensor, rank: int, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    r"""The top ``rank`` eigenpairs of :math:`S = X^\top X / n`, from :math:`X` alone.

    Up to :data:`_EIGH_LIMIT` features, the exact eigendecomposition of :math:`S`; beyond, a
    randomized subspace iteration (Halko, Martinsson & Tropp, 2011) on :math:`X` with ten extra
    directions and four power iterations, never forming the :math:`d \times d` matrix.

    Arguments:
        X: Centred samples, shape ``(n, d)``.
        rank: :math:`r \le d`.
        generator: The source of the random test matrix.

    Returns:
        Eigenvalues, shape ``(r,)``, decreasing, and eigenvectors, shape ``(d, r)``.
    """
    n, d = X.shape
    if d <= _EIGH_LIMIT:
        eigvals, eigvecs = torch.linalg.eigh(X.mT @ X / n)
        return eigvals.flip(0)[:rank], eigvecs.flip(1)[:, :rank]
    device = generator.device if generator is not None else X.device
    width = min(rank + 10, n, d)
    test = torch.randn(d, width, generator=generator, dtype=X.dtype, device=device).to(X.device)
    Q = torch.linalg.qr(X @ test).Q
    for _ in range(4):
        # re-orthonormalising each half step keeps the small directions from rounding away
        Q = torch.linalg.qr(X @ torch.linalg.qr(X.mT @ Q).Q).Q
    _, singular, Vh = torch.linalg.svd(Q.mT @ X, full_matrices=False)
    return singular[:rank] ** 2 / n, Vh[:rank].mT


def _principal_components(
    X: Tensor, rank: int, floor: float, generator: torch.Generator | None
) -> tuple[Tensor, Tensor]:
    r"""Probabilistic PCA of centred samples, with a per-feature diagonal.

    With the sample covariance :math:`S` (eigenvalues :math:`\ell_1 \ge \dots`, vectors
    :math:`V`), :math:`U = V_r (\operatorname{diag}(\ell_{1..r}) - s^2 I)^{1/2}` where
    :math:`s^2 = (\operatorname{tr} S - \sum_{k \le r} \ell_k) / (d - r)` is Tipping & Bishop's
    maximum-likelihood isotropic residual, and :math:`D = \operatorname{diag}(S - U U^\top)`,
    the per-feature variance the components leave, at least ``floor`` times the mean variance.
    So :math:`\operatorname{diag}(\Sigma) = \operatorname{diag}(S)` wherever the floor is not hit,
    and :math:`\Sigma` matches :math:`S` along the top components when the residual is even.

    Arguments:
        X: Centred samples, shape ``(n, d)``.
        rank: :math:`r \le d`.
        floor: The floor of :math:`D`, relative to the mean variance.
        generator: The source of randomness of :func:`_top_components`.

    Returns:
        :math:`U`, shape ``(d, r)``, and :math:`D`, shape ``(d,)``, positive.
    """
    d = X.shape[1]
    variance = (X**2).mean(0)
    top, vectors = _top_components(X, rank, generator)
    residual = (variance.sum() - top.sum()).clamp_min(0) / (d - rank) if rank < d else X.new_zeros(())
    U = vectors * (top - residual).clamp_min(0).sqrt()
    lowest = max(floor * float(variance.mean()), torch.finfo(X.dtype).tiny)
    D = (variance - (U**2).sum(1)).clamp_min(lowest)
    return U, D


def fit_gaussian(
    y: Tensor,
    A: Operator | Tensor | Callable[[Tensor], Tensor],
    noise_std: float | Tensor,
    shape: Sequence[int],
    *,
    rank: int | None = None,
    iterations: int | None = None,
    samples: int = 2,
    generator: torch.Generator | None = None,
    init: GaussianPrior | None = None,
    progress: bool = False,
    history: list[float] | None = None,
    floor: float = 1e-3,
    cg_iterations: int = 256,
) -> GaussianPrior:
    r"""Fit :math:`\mathcal{N}(\mu, \Sigma)` to linear observations by expectation-maximization.

    **Dense** (``rank=None``; :math:`d` up to a few hundred): exact EM in float64. The matrices
    :math:`A_i` are built once; each iteration computes every :math:`\mu_i` and the sum of the
    :math:`\Sigma_i` in the Kalman form of the module docstring (no inverse of :math:`\Sigma`,
    which may become singular) and sets

    .. math::
        \mu \leftarrow \frac{1}{N} \sum_i \mu_i, \qquad
        \Sigma \leftarrow \frac{1}{N} \sum_i \big(\Sigma_i + (\mu_i - \mu)(\mu_i - \mu)^\top\big).

    The evidence :math:`\sum_i \log p(y_i)` never decreases. Cost per iteration
    :math:`O(N (m^2 d + m d^2 + m^3))`.

    **Low rank plus diagonal** (``rank`` given; images): a stochastic (Monte-Carlo) EM, because
    :math:`\Sigma_i` (:math:`d \times d` per observation, 4.8 MB at :math:`d = 784` in float64)
    cannot be stored for every observation. Each iteration draws ``samples`` exact posterior
    samples per observation with :meth:`GaussianPrior.sample_posterior` (Matheron's rule,
    matrix-free beyond :data:`DENSE_LIMIT`), whose mean and second moment estimate those of the
    M-step without bias, sets :math:`\mu` to their mean and fits :math:`U, D` by probabilistic
    PCA to the centred samples (the top :math:`r` components, :math:`D` the per-feature
    residual variance clamped at ``floor`` times its mean). The evidence then rises up to the
    Monte-Carlo error of the M-step, which shrinks as :math:`N \cdot \mathrm{samples}` grows.

    Computation is in float64 throughout, and so is the returned prior (``.float()`` converts it).

    Arguments:
        y: Observations, shape ``(N, *y_shape)``.
        A: A linear operator for the batch (per-item parameters allowed), or dense matrices
            ``(m, d)`` or ``(N, m, d)``.
        noise_std: :math:`\sigma_y > 0`, a float or shape ``(N,)``.
        shape: The signal shape, :math:`d` values.
        rank: None for a dense covariance, else :math:`1 \le r \le d`.
        iterations: EM iterations; by default 100 (dense) or 20 (low rank).
        samples: Posterior samples per observation and iteration (low rank).
        generator: The source of randomness (low rank).
        init: The starting prior (:math:`\mathcal{N}(0, I)` by default); for a low-rank fit,
            a low-rank prior of rank ``rank``.
        progress: Show a progress bar.
        history: A list that receives the mean log-evidence per observation of the starting
            prior and of the prior after each iteration (``iterations + 1`` values). Free in
            the dense case; in the low-rank case each value costs one :meth:`log_evidence`.
        floor: The floor of :math:`D`, relative to the mean per-feature variance (low rank).
        cg_iterations: The most conjugate-gradient iterations per posterior sample (low rank).

    Returns:
        The fitted prior, float64, on the device of ``y``.

    Raises:
        TypeError: If the operator is not linear.
        ValueError: For mis-shaped or non-finite inputs, ``noise_std <= 0``, ``rank > d``, or an
            ``init`` that does not match.

    References:
        Rozet et al. (2024), DiEM, section 4.1; Tipping & Bishop (1999); Wei & Tanner (1990).
    """
    shape = _check_shape(shape)
    d = math.prod(shape)
    if rank is not None:
        rank = _check_positive_int("rank", rank)
        if rank > d:
            raise ValueError(f"rank must be at most d={d}, got {rank}")
    iterations = (
        (100 if rank is None else 20) if iterations is None else _check_positive_int("iterations", iterations)
    )
    samples = _check_positive_int("samples", samples)
    cg_iterations = _check_positive_int("cg_iterations", cg_iterations)
    if not (0 < floor < 1):
        raise ValueError(f"floor must lie in (0, 1), got {floor!r}")
    if init is not None:
        if not isinstance(init, GaussianPrior) or init.shape != shape:
            raise ValueError(f"init must be a GaussianPrior on signals of shape {shape}")
        if rank is not None and init.rank != rank:
            raise ValueError(
                f"a low-rank fit of rank {rank} needs a low-rank init of that rank, got rank {init.rank}"
            )
    A, y, noise_std = _check_observations(A, y, noise_std, shape, torch.float64)
    N = y.shape[0]
    if init is None:
        prior = GaussianPrior.standard(shape, rank=rank, device=y.device)
    elif init.low_rank:
        # a new module: Module.to would convert the caller's prior in place
        wide = {"device": y.device, "dtype": torch.float64}
        prior = GaussianPrior(
            init.mean.to(**wide),
            factor=init.factor.to(**wide),
            diagonal=init.diagonal.to(**wide),
            shape=shape,
        )
    else:
        prior = GaussianPrior(
            init.mean.to(y.device, torch.float64), init.covariance.to(y.device, torch.float64), shape=shape
        )

    steps: Any = range(iterations)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(steps, desc="gaussian EM", unit="iteration", leave=False)
        steps = bar

    if rank is None:
        M = _operator_matrix(A, y, shape)
        flat = _flat_real(y)
        noise_var = _noise_variance(noise_std, y)
        mean, covariance = prior.mean, prior.covariance_matrix()

        def terms() -> _Kalman:
            return _kalman(mean, M, M @ covariance, flat, noise_var)

        for _ in steps:
            current = terms()
            evidence = float(current.log_evidence.mean())
            if history is not None:
                history.append(evidence)
            if bar is not None:
                bar.set_postfix(log_evidence=f"{evidence:.4g}")
            means = mean + (current.gain.mT @ current.white[..., None])[..., 0]
            mean = means.mean(0)
            centred = means - mean
            shrinkage = torch.einsum("bmd,bme->de", current.gain, current.gain)
            covariance = covariance + (centred.mT @ centred - shrinkage) / N
            covariance = 0.5 * (covariance + covariance.mT)
        if history is not None:
            history.append(float(terms().log_evidence.mean()))
        return GaussianPrior(mean, covariance, shape=shape)

    y_repeated = y.repeat_interleave(samples, 0)
    std_repeated = noise_std.repeat_interleave(samples, 0)
    from cleanprior.operators.registry import repeat_items

    A_repeated = repeat_items(A, samples, N) if samples > 1 else A
    for _ in steps:
        if history is not None:
            history.append(float(prior.log_evidence(A, y, noise_std).mean()))
            if bar is not None:
                bar.set_postfix(log_evidence=f"{history[-1]:.4g}")
        x = prior.sample_posterior(A_repeated, y_repeated, std_repeated, generator, iterations=cg_iterations)
        x = x.reshape(N * samples, d)
        mean = x.mean(0)
        factor, diagonal = _principal_components(x - mean, rank, floor, generator)
        prior = GaussianPrior(mean, factor=factor, diagonal=diagonal, shape=shape)
    if history is not None:
        history.append(float(prior.log_evidence(A, y, noise_std).mean()))
    return prior
