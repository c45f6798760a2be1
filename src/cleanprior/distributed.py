"""Running under ``torchrun``: ranks, sharding of the E-step, gathering, gradient averaging.

The same command runs on one process or under ``torchrun --nproc_per_node N``: :func:`setup`
initialises :mod:`torch.distributed` from the environment ``torchrun`` sets (``RANK``,
``WORLD_SIZE``, ``MASTER_ADDR``...), with gloo on CPUs and NCCL on GPUs, and every other function
here is the identity on a single process. The learning methods use them so that

- the E-step's batches of observations are dealt to the ranks (batch ``i`` to rank
  ``i mod N``), each batch drawn with its own generator seeded from the batch's index, so that the
  posterior samples do not depend on the number of processes;
- the M-step is data-parallel with the same minibatches as one process: every rank draws the
  whole minibatch from the same generator, trains on its share of the rows, and the gradients are
  summed across ranks (:func:`all_reduce_gradients`), giving the single-process gradient up to
  floating-point summation order.

Only rank 0 writes files (:func:`is_main`); the others wait at :func:`barrier`.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from cleanprior.devices import resolve_device

__all__ = [
    "all_gather_rows",
    "all_reduce_gradients",
    "all_reduce_sum",
    "barrier",
    "is_main",
    "rank",
    "setup",
    "world_size",
]


def _active() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def setup(device: str | torch.device = "cpu") -> torch.device:
    """Join the process group ``torchrun`` describes, if any, and return this rank's device.

    On a single process (no ``WORLD_SIZE`` above 1 in the environment) nothing is initialised and
    ``device`` is returned as given. Under ``torchrun`` with ``device="cuda"``, rank ``r`` takes
    ``cuda:LOCAL_RANK``.

    Arguments:
        device: ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` (see
            :func:`cleanprior.devices.resolve_device`).

    Raises:
        RuntimeError: If ``torch.distributed`` is unavailable in this build of torch.
        ValueError: For a device this machine lacks.
    """
    device = resolve_device(device)
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or _active():
        if _active() and device.type == "cuda" and device.index is None:
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return device
    if not torch.distributed.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this build of torch has no torch.distributed")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl")
    else:
        torch.distributed.init_process_group("gloo")
    return device


def rank() -> int:
    """This process's rank (0 on a single process)."""
    return torch.distributed.get_rank() if _active() else 0


def world_size() -> int:
    """The number of processes (1 on a single process)."""
    return torch.distributed.get_world_size() if _active() else 1


def is_main() -> bool:
    """Whether this process writes the run's files (rank 0)."""
    return rank() == 0


def barrier() -> None:
    """Wait for every rank (nothing on a single process)."""
    if _active():
        torch.distributed.barrier()


def all_reduce_sum(x: Tensor) -> Tensor:
    """The sum of ``x`` over the ranks, in place, returned (``x`` itself on a single process)."""
    if _active() and world_size() > 1:
        torch.distributed.all_reduce(x)
    return x


def all_reduce_gradients(module: torch.nn.Module) -> None:
    """Sum every parameter's gradient over the ranks, in place.

    Each rank's loss is already its share of the minibatch mean, so the sum is the mean gradient
    of the whole minibatch.
    """
    if not (_active() and world_size() > 1):
        return
    for p in module.parameters():
        if p.grad is not None:
            torch.distributed.all_reduce(p.grad)


def all_gather_rows(x: Tensor) -> list[Tensor]:
    """Every rank's ``x`` (shapes ``(n_r, *rest)``, ``n_r`` may differ), in rank order.

    Arguments:
        x: This rank's rows, shape ``(n, *rest)``.

    Returns:
        ``world_size()`` tensors on ``x``'s device; ``[x]`` on a single process.
    """
    if not (_active() and world_size() > 1):
        return [x]
    count = torch.tensor([x.shape[0]], device=x.device)
    counts = [torch.zeros_like(count) for _ in range(world_size())]
    torch.distributed.all_gather(counts, count)
    rows = max(int(c) for c in counts)
    padded = torch.zeros((rows, *x.shape[1:]), dtype=x.dtype, device=x.device)
    padded[: x.shape[0]] = x
    gathered = [torch.zeros_like(padded) for _ in range(world_size())]
    torch.distributed.all_gather(gathered, padded)
    return [g[: int(c)] for g, c in zip(gathered, counts)]
