r"""The training loop: every network of the package is trained here.

A training step makes one or more :class:`Update`\ s in order. Each update draws its loss,
descends it with AdamW on its own parameters (learning rate ``lr * lr_factor(step)``), clips
the gradient norm and moves its exponential moving average,

.. math::
    \theta \leftarrow \operatorname{AdamW}(\theta, \nabla_\theta \ell_k(\theta)), \qquad
    \bar\theta \leftarrow \bar\theta + (1 - \beta)(\theta - \bar\theta).

The prior's denoising score matching (:func:`cleanprior.diffusion.training.train`) is one
update per step; the reconstruction networks (:mod:`cleanprior.learning.sud`, ``noise2score``,
``sure``) are one update with their own loss; FlowDiff alternates a flow update and prior
updates within a step. A method brings only its loss; the rest is written here once:

- **no host synchronisation inside a step**: the losses stay on the device and are read every
  ``log_every`` steps (and before each checkpoint), where the non-finite check acts;
- **the last good state is never overwritten**: a checkpoint is written only after the losses
  up to it were read finite and the weights are finite; a non-finite loss raises naming its
  step, and the file keeps the last checkpoint before it;
- **exact resume**: the weights, the moving averages, the optimisers, the generator (on the
  training device) and the history are checkpointed, so a resumed run repeats the
  uninterrupted one;
- fused AdamW on CUDA, bfloat16 autocast (``amp``), data-parallel gradients under ``torchrun``,
  a progress bar with the mean recent loss.

References:
    Loshchilov & Hutter (2019). Decoupled Weight Decay Regularization (AdamW).
    Karras et al. (2024). Analyzing and Improving the Training Dynamics of Diffusion Models
    (EMA of the weights). https://arxiv.org/abs/2312.02696
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["Trained", "Update", "ema_update", "optimize", "resume_state"]

StepLoss = Callable[[int, int], "Tensor | Mapping[str, Tensor]"]


@dataclasses.dataclass
class Update:
    """One parameter update of a training step.

    Attributes:
        name: The update's name: its loss is recorded under it in the history (and its other
            terms under their own names); its optimiser is checkpointed under it.
        module: The parameters to update (the module's trainable ones), in place.
        loss: ``loss(step, repeat)``: a scalar tensor, or a mapping whose ``"loss"`` is descended
            and whose other scalar terms are recorded. All its randomness must come from
            generators whose state the loop checkpoints or that are seeded from the step, so
            that a resumed run repeats the uninterrupted one.
        lr: AdamW's peak learning rate.
        weight_decay: AdamW's decoupled weight decay.
        clip: Maximum gradient norm (0 disables clipping).
        ema: The moving average of ``module`` to update after each step of it (None: none).
        ema_decay: :math:`\\beta` of the moving average, in [0, 1).
        repeats: Updates of this kind per step (``repeat`` runs over ``range(repeats)``); the
            history records their mean.
        train_mode: Put ``module`` in training mode for its loss (dropout on).
    """

    name: str
    module: nn.Module
    loss: StepLoss
    lr: float
    weight_decay: float = 0.0
    clip: float = 0.0
    ema: nn.Module | None = None
    ema_decay: float = 0.0
    repeats: int = 1
    train_mode: bool = True


@dataclasses.dataclass
class Trained:
    """What :func:`optimize` returns.

    Attributes:
        step: Steps done in all (resumed ones included).
        history: Per recorded term, its value at every step of the whole run.
        state: The training state as last checkpointed (or at the end): ``step``, ``history``,
            ``generator``, and per update ``models``, ``emas``, ``optimizers``.
    """

    step: int
    history: dict[str, list[float]]
    state: dict[str, Any]


def _adamw(update: Update, device: torch.device) -> torch.optim.AdamW:
    parameters = [p for p in update.module.parameters() if p.requires_grad]
    # fused kernels on CUDA; the multi-tensor path elsewhere (many small tensors cost more in a
    # per-tensor loop than in arithmetic)
    fused = device.type == "cuda"
    return torch.optim.AdamW(
        parameters, lr=update.lr, weight_decay=update.weight_decay, fused=fused, foreach=None if fused else True
    )


def ema_update(ema: nn.Module, module: nn.Module, decay: float) -> None:
    r"""Move the moving average towards the weights, :math:`\bar\theta \leftarrow \beta \bar\theta +
    (1 - \beta)\theta`, and copy the buffers.

    Arguments:
        ema: The moving average, updated in place.
        module: The trained module.
        decay: :math:`\beta`, in [0, 1).
    """
    with torch.no_grad():
        targets = list(ema.parameters())
        if targets:
            torch._foreach_lerp_(targets, list(module.parameters()), 1 - decay)
        for e, b in zip(ema.buffers(), module.buffers(), strict=True):
            e.copy_(b)


def resume_state(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """The loop's state from a checkpoint of one update named ``"loss"`` (the layout of
    :func:`cleanprior.train` and the reconstruction networks), also of the layouts before the
    one loop: ``training`` with ``model``, ``optimizer`` and ``losses`` or ``history``, beside
    the weights to use under ``state_dict``.
    """
    training = checkpoint["training"]
    if "models" in training:
        return dict(training)
    history = {k: list(v) for k, v in training.get("history", {}).items()}
    if "losses" in training:
        history["loss"] = list(training["losses"])
    return {
        "step": training["step"],
        "history": history,
        "generator": training["generator"],
        "models": {"loss": training.get("model", checkpoint["state_dict"])},
        "emas": {"loss": checkpoint["state_dict"]},
        "optimizers": {"loss": training["optimizer"]},
    }


def _cpu(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().cpu() for k, v in state.items()}


def _finite(modules: Sequence[nn.Module]) -> bool:
    flags = [torch.isfinite(p).all() for m in modules for p in m.parameters()]
    return bool(torch.stack(flags).all()) if flags else True


def optimize(
    updates: Sequence[Update],
    *,
    steps: int,
    generator: torch.Generator | None,
    until: int | None = None,
    lr_factor: Callable[[int], float] | None = None,
    amp: bool = False,
    log_every: int = 50,
    checkpoint_every: int = 1000,
    state: Mapping[str, Any] | None = None,
    save: Callable[[dict[str, Any]], None] | None = None,
    before_step: Callable[[int], Sequence[str]] | None = None,
    progress: bool = True,
    desc: str = "training",
    callback: Callable[[int, float], None] | None = None,
    postfix: Callable[[int], Mapping[str, str]] | None = None,
) -> Trained:
    r"""Run training steps ``start .. until`` (``start`` from ``state``, else 0).

    Arguments:
        updates: The updates of a step, made in this order.
        steps: The run's length (the learning-rate schedule spans it).
        generator: The run's generator on the training device: its state is checkpointed and
            restored (the losses draw from it). None when the losses draw only from generators
            seeded by the step.
        until: Stop once this many steps are done in all (``steps`` when omitted), with a
            checkpoint there; resuming from it goes on, so training in chunks equals training
            in one go.
        lr_factor: The learning-rate multiplier at a step (constant 1 when omitted).
        amp: bfloat16 autocast around the losses (on GPUs).
        log_every: Steps between reads of the losses (the only host synchronisations).
        checkpoint_every: Steps between calls of ``save``.
        state: A training state to resume from (:attr:`Trained.state`, as ``save`` received it);
            an entry it lacks (a model, a moving average, an optimiser) is taken as it is now.
        save: ``save(state)`` writes a checkpoint (its ``"step"`` says where); called every
            ``checkpoint_every`` steps and at the end, only with finite losses and weights.
        before_step: ``before_step(step)`` runs before a step and returns the names of updates
            whose optimiser state to start afresh (a method that re-initialises weights, as
            FlowDiff's resets).
        progress: Show a progress bar with the mean loss of the last reads.
        desc: The progress bar's label.
        callback: ``callback(step, loss)`` for every step, called at the reads with the first
            update's loss.
        postfix: More fields of the progress bar, computed at a read.

    Returns:
        The step reached, the history and the state.

    Raises:
        ValueError: For ``until`` outside ``[0, steps]``, or no updates.
        FloatingPointError: If a loss or the weights become non-finite; nothing is written over
            the last checkpoint.
    """
    from cleanprior import distributed

    if not updates:
        raise ValueError("optimize needs at least one update")
    end = steps if until is None else int(until)
    if not 0 <= end <= steps:
        raise ValueError(f"until must lie in [0, steps = {steps}], got {until}")
    schedule = lr_factor or (lambda step: 1.0)
    device = next(updates[0].module.parameters()).device
    optimizers = {u.name: _adamw(u, device) for u in updates}
    history: dict[str, list[float]] = {}
    start = 0
    if state is not None:
        # an entry the state lacks is taken as it is now (a method that resets weights passes
        # only what the modules do not hold)
        for u in updates:
            if u.name in state.get("models", {}):
                u.module.load_state_dict(state["models"][u.name])
            if u.ema is not None and u.name in state.get("emas", {}):
                u.ema.load_state_dict(state["emas"][u.name])
            if state.get("optimizers", {}).get(u.name) is not None:
                optimizers[u.name].load_state_dict(state["optimizers"][u.name])
        if generator is not None and state.get("generator") is not None:
            generator.set_state(state["generator"])
        history = {k: list(v) for k, v in state.get("history", {}).items()}
        start = int(state["step"])

    def snapshot(step: int) -> dict[str, Any]:
        return {
            "step": step,
            "history": {k: list(v) for k, v in history.items()},
            "generator": None if generator is None else generator.get_state(),
            "models": {u.name: _cpu(u.module.state_dict()) for u in updates},
            "emas": {u.name: _cpu(u.ema.state_dict()) for u in updates if u.ema is not None},
            "optimizers": {name: opt.state_dict() for name, opt in optimizers.items()},
        }

    # per step, the recorded terms as device scalars; read (one synchronisation) at each read
    pending: list[tuple[int, dict[str, Tensor]]] = []

    def read() -> None:
        if not pending:
            return
        names = sorted({k for _, terms in pending for k in terms})
        table = torch.stack([
            torch.stack([terms.get(k, torch.tensor(float("nan"), device=device)).float() for k in names])
            for _, terms in pending
        ]).tolist()
        descended = {u.name for u in updates}
        for (step, _), row in zip(pending, table, strict=True):
            values = dict(zip(names, row, strict=True))
            bad = [k for k in descended if k in values and not math.isfinite(values[k])]
            if bad:
                pending.clear()
                raise FloatingPointError(
                    f"the training loss ({bad[0]}) became non-finite at step {step}; the last checkpoint is "
                    f"kept (a smaller learning rate or clipping may help)"
                )
            for key, value in values.items():
                history.setdefault(key, []).append(value)
            if callback is not None:
                callback(step, values[updates[0].name])
        pending.clear()
        if bar is not None:
            recent = history[updates[0].name][-log_every:]
            bar.set_postfix(loss=f"{sum(recent) / len(recent):.4g}", **(postfix(step) if postfix else {}))

    def checkpoint(step: int) -> dict[str, Any]:
        read()
        if not _finite([m for u in updates for m in (u.module, u.ema) if m is not None]):
            raise FloatingPointError(f"the weights became non-finite by step {step}; the last checkpoint is kept")
        current = snapshot(step)
        if save is not None and distributed.is_main():
            save(current)
        return current

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(desc=desc, unit="step", initial=start, total=steps, dynamic_ncols=True)
    world = distributed.world_size()
    for step in range(start, end):
        if before_step is not None:
            for name in before_step(step):
                update = next(u for u in updates if u.name == name)
                optimizers[name] = _adamw(update, device)
        terms: dict[str, Tensor] = {}
        for update in updates:
            optimizer = optimizers[update.name]
            for group in optimizer.param_groups:
                group["lr"] = update.lr * schedule(step)
            values = []
            update.module.train(update.train_mode)
            for repeat in range(update.repeats):
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                    out = update.loss(step, repeat)
                loss = out if isinstance(out, Tensor) else out["loss"]
                if not isinstance(out, Tensor):
                    terms.update({k: v.detach() for k, v in out.items() if k != "loss"})
                optimizer.zero_grad(set_to_none=True)
                # only this update's gradients: another update's modules in its loss stay fixed
                loss.backward(inputs=optimizer.param_groups[0]["params"])
                if world > 1:
                    distributed.all_reduce_gradients(update.module)
                    loss = distributed.all_reduce_sum(loss.detach().clone())
                if update.clip > 0:
                    nn.utils.clip_grad_norm_(optimizer.param_groups[0]["params"], update.clip)
                optimizer.step()
                if update.ema is not None:
                    ema_update(update.ema, update.module, update.ema_decay)
                values.append(loss.detach())
            terms[update.name] = values[0] if len(values) == 1 else torch.stack(values).mean()
        pending.append((step, terms))
        if bar is not None:
            bar.update(1)
        done = step + 1
        if done % checkpoint_every == 0 and done < end:
            checkpoint(done)
        elif done % log_every == 0:
            read()
    for update in updates:
        update.module.eval()
    final = checkpoint(max(start, end))
    if bar is not None:
        bar.close()
    distributed.barrier()
    return Trained(max(start, end), history, final)
