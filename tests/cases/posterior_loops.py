"""Contract cases of DiffPIR, data consistency, ILVR and MCG (see tests/test_posterior.py).

Measured on the contract's bimodal problem (64 steps; fraction of the prior's distance, seeds 2, 3,
4 of the sampler; the exact posterior's own floor measures about 0.14 there): DiffPIR (lam=1,
zeta=0.3) 0.15 / 0.06 / 0.15, with zeta=1 0.09 / 0.07 / 0.14; data consistency by gradient steps
0.14 / 0.11 / 0.16, by projection 0.16 / 0.10 / 0.18; ILVR 0.17 / 0.11 / 0.08; MCG (Gaussian DPS
step) 0.17 / 0.11 / 0.08, with zeta=0.5 the same to 1e-6 (on this isotropic mixture the DPS
gradient barely moves the unobserved coordinate, and the projection resets the observed one).
The projections pin the observed coordinate to y itself, noise included; its posterior spread
(0.08) is small next to the distance between the modes, so they still score near the floor.
"""

CONTRACT = {
    "diffpir": (dict(steps=64), 0.3),
    "dc": (dict(steps=64), 0.3),
    "dc[projection]": (dict(steps=64, mode="projection"), 0.3),
    "ilvr": (dict(steps=64), 0.3),
    "mcg": (dict(steps=64), 0.3),
    "mcg[zeta]": (dict(steps=64, zeta=0.5), 0.3),
}
