"""Faults during training: NaN guards, a real SIGKILL mid-run then ``--ckpt_path last``, a truncated checkpoint.

The crash/resume tests run ``python -m lit_keomni fit --config recipes/stageN.yaml`` in a subprocess, exactly as a
user would, with tiny-model overrides and a second ``--config`` (written to ``tmp_path``) that sends every output
there, checkpoints every 2 steps and logs every step to a CSVLogger. The losses after the resume must equal those of an
uninterrupted run of the same command at the same steps.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from lit_keomni.guards import NonFiniteError, NonFiniteGuard
from tests.conftest import STAGE1_TINY
from tests.test_stage1 import LossRecorder, make

ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------------------------- NaN guards
class PoisonAudio(L.Callback):
    """Writes NaN into the first clip of the batches at the given global steps (the data validation of ``prepare``
    rejects NaN audio, so a NaN that reaches training comes from inside: injected here, before the forward pass)."""

    def __init__(self, steps: set[int]) -> None:
        self.steps = steps
        self.ids: dict[int, list[str]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step in self.steps:
            batch["audio"][0, :200] = float("nan")
            self.ids[trainer.global_step] = list(batch["id"])


class WeightWatch(L.Callback):
    """Parameters and buffers before and after each batch, to prove a skipped step changes nothing."""

    def __init__(self) -> None:
        self.before: dict[int, dict[str, torch.Tensor]] = {}
        self.after: dict[int, dict[str, torch.Tensor]] = {}

    @staticmethod
    def _state(module):
        return {k: v.detach().clone() for k, v in module.state_dict().items()}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before[trainer.global_step] = self._state(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after[trainer.global_step - 1] = self._state(pl_module)


def _all_finite(state: dict) -> bool:
    return all(torch.isfinite(v).all() for v in state.values() if torch.is_tensor(v) and v.is_floating_point())


def test_guard_stop_raises_before_the_step_and_keeps_last_ckpt_good(prepared, tmp_path):
    poison = PoisonAudio({3})
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0,
                                               every_n_train_steps=1)
    model, data, trainer = make(prepared, tmp_path, 6, [poison, NonFiniteGuard("stop"), ckpt], vq_start=0.2)
    with pytest.raises(NonFiniteError) as e:
        trainer.fit(model, data)
    msg = str(e.value)
    assert "loss is nan" in msg and "global step 3" in msg
    assert all(repr(i) in msg for i in poison.ids[3]), (msg, poison.ids)
    assert str(tmp_path / "ckpt" / "last.ckpt") in msg
    assert _all_finite(model.state_dict())  # in memory: the optimizer never saw the NaN gradients
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)
    assert saved["global_step"] == 3 and _all_finite(saved["state_dict"])
    assert not any(p.name.startswith(".last.ckpt") for p in (tmp_path / "ckpt").iterdir())


def test_guard_skip_drops_the_batch_counts_and_keeps_weights(prepared, tmp_path):
    poison, watch, rec = PoisonAudio({2, 4}), WeightWatch(), LossRecorder()
    guard = NonFiniteGuard("skip")
    # VQ on from step 1, so the NaN also reaches the EMA codebook in the forward pass (restored by the guard)
    model, data, trainer = make(prepared, tmp_path, 6, [poison, guard, watch, rec], vq_start=0.2)
    with pytest.warns(UserWarning, match="skipped the batch with sample ids") as warned:
        trainer.fit(model, data)
    assert trainer.global_step == 6 and guard.skipped == 2
    assert float(trainer.callback_metrics["train/skipped_nonfinite"]) == 2.0
    text = " ".join(str(w.message) for w in warned)
    assert all(repr(i) in text for step in (2, 4) for i in poison.ids[step])
    for step in (2, 4):
        assert rec.losses[step + 1] != rec.losses[step + 1]  # NaN: that batch's loss
        for k, v in watch.before[step].items():  # ... and the step changed no weight and no buffer
            assert torch.equal(v, watch.after[step][k]), (step, k)
    for step in (1, 3, 5):  # the other steps trained
        assert any(not torch.equal(v, watch.after[step][k]) for k, v in watch.before[step].items() if "weight" in k)
    assert _all_finite(model.state_dict())
    assert guard.state_dict() == {"skipped": 2}


def test_guard_checks_gradients_too(prepared, tmp_path):
    class PoisonGrad(L.Callback):  # a finite loss with a NaN gradient (e.g. sqrt at 0 in some custom loss)
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if trainer.global_step == 1:
                next(p for p in pl_module.parameters() if p.grad is not None).grad.fill_(float("inf"))

    guard = NonFiniteGuard("stop")
    model, data, trainer = make(prepared, tmp_path, 3, [PoisonGrad(), guard], vq_start=0.0)
    # callbacks run in order: put the guard after the poisoning callback
    with pytest.raises(NonFiniteError, match=r"non-finite gradients in 1 parameters .* at global step 1"):
        trainer.fit(model, data)
    with pytest.raises(ValueError, match="mode must be 'stop' or 'skip'"):
        NonFiniteGuard("ignore")
