"""Guards against non-finite training: a NaN/inf loss or gradient never reaches the weights or a checkpoint.

``NonFiniteGuard`` records each batch's sample ids (``batch["id"]``) and its loss (``on_before_backward``), and checks
loss and gradients in ``on_before_optimizer_step`` — after backward (and AMP unscaling), before gradient clipping and
``optimizer.step``: the last moment before any weight changes, with one device sync per step. On a non-finite value
the module's floating-point buffers are first restored to their values before the batch (the forward pass may have
fed NaN into an EMA codebook; keeping the copy costs one buffer-sized memcpy per step). Then:

- ``mode="stop"`` (default) raises `NonFiniteError` naming the global step and the sample ids. No weight has been
  updated, so no checkpoint with NaN weights is written (not even by an ``OnExceptionCheckpoint``) and ``last.ckpt``
  on disk stays the previous good one.
- ``mode="skip"`` drops the gradients (``p.grad = None``: AdamW then leaves those parameters, their moments and step
  counts alone; zero gradients would not, since momentum and weight decay still move them), counts the batch in
  ``train/skipped_nonfinite`` and warns with the ids. The learning-rate schedule still advances one step.

Under 16-bit AMP with a ``GradScaler``, inf/NaN gradients are how the scaler finds its scale: it skips those steps
itself, so the guard then checks only the loss. With several ranks, the decision is all-reduced so every rank stops
or skips together.
"""

from __future__ import annotations

import warnings
from typing import Any, Literal

import lightning as L
import torch
from torch import Tensor

__all__ = ["NonFiniteError", "NonFiniteGuard"]


class NonFiniteError(FloatingPointError):
    """A non-finite loss or gradient stopped training before the optimizer step; the message names step and ids."""


class NonFiniteGuard(L.Callback):
    """Stop (or skip the batch) when the loss or a gradient is NaN/inf, before the optimizer changes any weight."""

    def __init__(self, mode: Literal["stop", "skip"] = "stop", check_grads: bool = True) -> None:
        """
        Args:
            mode: "stop" raises ``NonFiniteError`` before the optimizer step; "skip" drops that step's gradients,
                restores the buffers and goes on, counting the batch in ``train/skipped_nonfinite``.
            check_grads: Also check every gradient (one reduction per parameter per step), not only the loss.
        """
        if mode not in ("stop", "skip"):
            raise ValueError(f"NonFiniteGuard: mode must be 'stop' or 'skip', got {mode!r}")
        self.mode = mode
        self.check_grads = check_grads
        self.skipped = 0
        """Batches skipped so far (saved in checkpoints, so the count survives a resume)."""
        self._ids: list[Any] = []  # sample ids of the micro-batches since the last optimizer step
        self._losses: list[Tensor] = []  # their losses, kept on the device: no sync before backward
        self._buffers: dict[str, Tensor] | None = None
        self._window_done = True

    # ------------------------------------------------------------------ record
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if self._window_done:  # first micro-batch since the last optimizer step
            self._window_done = False
            self._ids, self._losses = [], []
            # The forward pass may update buffers (an EMA codebook): keep a copy, restored if this step is bad.
            self._buffers = {k: b.detach().clone() for k, b in pl_module.named_buffers() if b.is_floating_point()}
        ids = batch.get("id") if isinstance(batch, dict) else None
        self._ids.extend(ids if isinstance(ids, (list, tuple)) else [f"batch {batch_idx}"] if ids is None else [ids])

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: Tensor) -> None:
        self._losses.append(loss.detach())

    # ------------------------------------------------------------------ decide
    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer) -> None:
        self._window_done = True
        checks = [("loss", loss) for loss in self._losses]
        if self.check_grads and not self._scaler_active(trainer):
            checks += [(n, p.grad) for n, p in pl_module.named_parameters() if p.grad is not None]
        # FSDP gradients are DTensors: check this rank's shard (the ranks' verdicts are combined below)
        local = [t.to_local() if hasattr(t, "to_local") else t for _, t in checks]
        ok = torch.stack([torch.isfinite(t).all() for t in local]).tolist() if local else []  # the one device sync
        bad = [name for (name, _), good in zip(checks, ok) if not good]
        reason = None
        if "loss" in bad:
            reason = f"loss is {next(float(t) for (n, t), good in zip(checks, ok) if n == 'loss' and not good)}"
        elif bad:
            reason = f"non-finite gradients in {len(bad)} parameters ({', '.join(bad[:3])}{', …' if len(bad) > 3 else ''})"
        if trainer.world_size > 1:  # every rank must stop or skip together, or the next collective hangs
            anywhere = trainer.strategy.reduce_boolean_decision(reason is not None, all=False)
            if anywhere and reason is None:
                reason = "non-finite loss or gradients on another rank"
        if reason is None:
            return
        self._restore_buffers(pl_module)
        step = trainer.global_step
        where = f"at global step {step} (epoch {trainer.current_epoch}, rank {trainer.global_rank})"
        ids = _short_list(self._ids)
        if self.mode == "stop":
            last = getattr(trainer.checkpoint_callback, "last_model_path", "") or "none written yet"
            raise NonFiniteError(f"{reason} {where}, sample ids {ids}: stopped before the optimizer step, so the "
                                 f"weights are unchanged (last checkpoint: {last}). Look at those samples, lower the "
                                 f"learning rate, or use NonFiniteGuard(mode='skip').")
        for p in pl_module.parameters():
            p.grad = None
        self.skipped += 1
        warnings.warn(f"NonFiniteGuard: {reason} {where}; skipped the batch with sample ids {ids} "
                       f"({self.skipped} skipped so far)")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.mode == "skip":
            pl_module.log("train/skipped_nonfinite", float(self.skipped), on_step=True, on_epoch=False, reduce_fx="max")

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped = int(state_dict.get("skipped", 0))

    # ------------------------------------------------------------------ helpers
    @torch.no_grad()
    def _restore_buffers(self, pl_module: L.LightningModule) -> None:
        for name, b in pl_module.named_buffers():
            if name in (self._buffers or {}):
                b.copy_(self._buffers[name])

    @staticmethod
    def _scaler_active(trainer: L.Trainer) -> bool:
        return getattr(trainer.precision_plugin, "scaler", None) is not None


def _short_list(ids: list[Any], limit: int = 16) -> str:
    shown = ", ".join(repr(i) for i in ids[:limit])
    return f"[{shown}{f', … {len(ids) - limit} more' if len(ids) > limit else ''}]"
