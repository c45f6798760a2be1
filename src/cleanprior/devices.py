"""Where to compute: ``--device auto|cpu|cuda|cuda:N`` resolved once, before any work, and the
random generator that goes with it.

Every command and every library entry point that takes a ``device`` passes it through
:func:`resolve_device`, so that ``auto`` (the default) means the GPU when there is one, and a GPU
asked for on a machine without one fails at once, with the fix in the message, rather than deep
inside a run.
"""

from __future__ import annotations

import torch

__all__ = ["device_generator", "resolve_device"]


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """The device a ``--device`` option names.

    Arguments:
        device: ``"auto"`` (CUDA when available, else the CPU), ``"cpu"``, ``"cuda"``,
            ``"cuda:N"``, or a :class:`torch.device`.

    Returns:
        The device; ``"auto"`` on a GPU machine gives ``cuda`` without an index, so that under
        ``torchrun`` each rank takes its own GPU (:func:`cleanprior.distributed.setup`).

    Raises:
        ValueError: For a name torch does not know, or a CUDA device this machine lacks.
    """
    if isinstance(device, str) and device.strip().lower() == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}: use --device auto, cpu, cuda or cuda:N") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: this machine has no CUDA GPU (or torch was built without CUDA); "
                             "use --device cpu or --device auto")
        count = torch.cuda.device_count()
        if resolved.index is not None and resolved.index >= count:
            raise ValueError(f"--device {device}: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}; "
                             "use one of them or --device auto")
    return resolved


def device_generator(generator: torch.Generator | None, device: torch.device) -> torch.Generator:
    """The run's generator on the training ``device``.

    The one given when it is on ``device``; otherwise one on ``device`` seeded from it (or from
    torch's default generator when none is given), so that minibatches and noise are drawn where
    they are used and the run still follows from the caller's generator.
    """
    if generator is not None and generator.device.type == device.type:
        return generator
    seed = int(torch.randint(2**62, (), generator=generator))
    return torch.Generator(device=device).manual_seed(seed)
