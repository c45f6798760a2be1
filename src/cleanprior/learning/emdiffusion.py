r"""EMDiffusion: EM from a prior pre-trained on a few clean images, with DPS retuned every round.

Where DiEM starts from a Gaussian fitted to the observations, EMDiffusion starts from a diffusion
prior trained on a handful of clean images (10 to 500, from the same or another dataset), then
alternates as DiEM does:

- **E-step**: for every observation one DPS posterior sample
  :math:`x_i \sim q_{\theta_k}(x \mid y_i)`, with the likelihood step size :math:`\zeta`
  (the paper's :math:`\lambda`) chosen afresh for the round;
- **M-step**: denoising score matching on the :math:`x_i`, warm-started from :math:`\theta_k`.

**The choice of** :math:`\zeta`. DPS's step size trades prior against data: too small and the
samples ignore :math:`y`, too large and they over-fit its noise or diverge. The paper tunes it by
hand per round; here each round tries every value of ``EMConfig.zetas`` on
``EMConfig.tune_observations`` held-out observations and keeps the one whose posterior
predictive check is nearest 1 on a log scale,

.. math:: \zeta_k = \arg\min_{\zeta} \Big| \log \frac{1}{n}\sum_i
          \frac{\|y_i - A_i x_i^{(\zeta)}\|^2}{m \sigma_y^2} \Big|,

i.e. the samples whose residuals are as large as the noise says they should be (no ground truth
is needed). Every candidate's check and the chosen :math:`\zeta` are recorded in the round's
metrics (``dps_zeta``) and in ``RUN/rounds/KK/zeta.json``.

References:
    Bai, Wang, Chen, Wang & Bouman (2024). An Expectation-Maximization Algorithm for Training
    Clean Diffusion Models from Corrupted Observations (EMDiffusion).
    https://arxiv.org/abs/2407.01014
    Chung, Kim, Mccann, Klasky & Ye (2023). Diffusion Posterior Sampling for General Noisy
    Inverse Problems (DPS). https://arxiv.org/abs/2209.14687
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from typing import Any

import torch
from torch import Tensor

from cleanprior import distributed
from cleanprior.diffusion.precondition import PreconditionedDenoiser
from cleanprior.diffusion.training import train
from cleanprior.learning.em import DiEM, m_step, posterior_batches
from cleanprior.learning.rounds import Round, round_generator
from cleanprior.runs.atomic import write_json
from cleanprior.runs.checkpoint import save_denoiser

__all__ = ["EMDiffusion", "choose_zeta"]


def choose_zeta(
    prior: PreconditionedDenoiser,
    observations: Any,
    config: Any,
    *,
    seed_keys: tuple[int, ...],
) -> tuple[float, dict[str, float]]:
    r"""The DPS step size whose posterior samples explain the observations as well as the noise allows.

    Arguments:
        prior: The current prior denoiser.
        observations: The :class:`~cleanprior.data.files.Observations` it is tuned on (held out
            from training).
        config: The :class:`~cleanprior.learning.em.EMConfig` (``zetas``, sampler options).
        seed_keys: What, with the run's seed, seeds the draws (the same for every candidate).

    Returns:
        The chosen :math:`\zeta` and every candidate's mean posterior predictive check
        :math:`\|y - A x\|^2 / (m \sigma_y^2)` (non-finite samples give ``inf``).
    """
    from cleanprior.metrics.diagnostics import posterior_predictive

    dps = dataclasses.replace(config, posterior="dps")
    checks: dict[str, float] = {}
    for zeta in config.zetas:
        x = posterior_batches(prior, observations, config=dps, samples=1, seed_keys=seed_keys, distribute=False,
                              options={"zeta": zeta})
        if not torch.isfinite(x).all():
            checks[str(zeta)] = math.inf
            continue
        ppc = posterior_predictive(observations.y, observations.operator, x.to(observations.y.device),
                                   observations.noise_std)
        checks[str(zeta)] = float(ppc.mean())
    best = min(config.zetas, key=lambda z: abs(math.log(checks[str(z)])) if 0 < checks[str(z)] < math.inf else math.inf)
    return float(best), checks


class EMDiffusion(DiEM):
    """EMDiffusion's rounds (a :class:`~cleanprior.learning.rounds.Method`).

    Subclasses :class:`~cleanprior.learning.em.DiEM` only for its E-step and M-step plumbing: the
    start (a prior trained on the few clean images) and the E-step's method (DPS with a step size
    chosen each round) differ. Files: ``RUN/init.pt`` (the start's training checkpoint),
    ``RUN/rounds/KK/zeta.json`` (the round's choice), then DiEM's.

    Arguments:
        init_clean: The few clean images, shape ``(n, *shape)``, ``10 <= n`` typically ``<= 500``.
    """

    name = "emdiffusion"
    start_label = "clean start"

    def __init__(self, init_clean: Tensor) -> None:
        super().__init__()
        self.init_clean = init_clean.detach().float().cpu()

    def check(self, observations: Any, config: Any) -> None:
        shape = tuple(observations.shape)
        if tuple(self.init_clean.shape[1:]) != shape:
            raise ValueError(f"the clean start images have shape {tuple(self.init_clean.shape[1:])}, the observations' "
                             f"signals {shape}")
        if len(self.init_clean) < 2:
            raise ValueError("EMDiffusion needs at least 2 clean images to pre-train its start (the paper uses 10 to 500)")
        if not torch.isfinite(self.init_clean).all():
            raise ValueError("the clean start images contain NaN or infinite values")

    def settings(self) -> dict[str, Any]:
        digest = hashlib.sha256(self.init_clean.numpy().tobytes()).hexdigest()[:16]
        return {"init_clean": {"count": len(self.init_clean), "sha256": digest}}

    def start(self, context: Round) -> tuple[PreconditionedDenoiser, bool]:
        from cleanprior.runs.prior import default_network

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(2**62, (), generator=round_generator(context.config.seed, 8))))
            model = default_network(context.shape, context.network).to(context.device)
        training = dataclasses.replace(context.training, progress=context.progress and distributed.is_main())
        metadata = {"trained_on": f"{len(self.init_clean)} clean images (EMDiffusion's start)",
                    "shape": list(context.shape), "network": dataclasses.asdict(context.network)}
        result = train(model, self.init_clean.to(context.device), training,
                       generator=round_generator(context.config.seed, 10), checkpoint=context.run / "init.pt",
                       resume=True, metadata=metadata)
        if distributed.is_main() and not (context.run / "checkpoint.pt").exists():
            save_denoiser(context.run / "checkpoint.pt", result.denoiser, metadata=metadata)
        return result.denoiser, False

    def round(self, context: Round, k: int, prior: Any) -> tuple[PreconditionedDenoiser, dict[str, Any]]:
        path = context.folder(k) / "zeta.json"
        if path.exists():
            chosen = json.loads(path.read_text())
        else:
            tuning = context.heldout if context.heldout is not None else context.data
            tuning = tuning.subset(torch.arange(min(len(tuning), context.config.tune_observations)))
            zeta, checks = choose_zeta(prior, tuning, context.config, seed_keys=(9, k))
            chosen = {"zeta": zeta, "ppc": checks}
            if distributed.is_main():
                context.folder(k).mkdir(parents=True, exist_ok=True)
                write_json(path, chosen)
            distributed.barrier()
        x, seconds = self.e_step(context, k, prior, exact=False, options={"zeta": chosen["zeta"]},
                                 config=dataclasses.replace(context.config, posterior="dps"))
        denoiser, row = m_step(context, k, x, prior, self.name)
        return denoiser, dict(row, estep_seconds=seconds, dps_zeta=chosen["zeta"])
