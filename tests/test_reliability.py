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

from lit_keomni.checkpoints import AtomicCheckpointIO, CheckpointLoadError
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
    # step 0: before the VQ switch (step 3), the NaN batch's features must not reach the k-means codebook init;
    # step 4: VQ on, the NaN reaches the EMA codebook in the forward pass (the guard restores the buffers)
    poison, watch, rec = PoisonAudio({0, 4}), WeightWatch(), LossRecorder()
    guard = NonFiniteGuard("skip")
    model, data, trainer = make(prepared, tmp_path, 6, [poison, guard, watch, rec], vq_start=0.5)
    with pytest.warns(UserWarning, match="skipped the batch with sample ids") as warned:
        trainer.fit(model, data)
    assert trainer.global_step == 6 and guard.skipped == 2
    assert float(trainer.callback_metrics["train/skipped_nonfinite"]) == 2.0
    text = " ".join(str(w.message) for w in warned)
    assert all(repr(i) in text for step in (0, 4) for i in poison.ids[step])
    for step in (0, 4):
        assert rec.losses[step + 1] != rec.losses[step + 1]  # NaN: that batch's loss
        for k, v in watch.before[step].items():  # ... and the step changed no weight and no buffer
            assert torch.equal(v, watch.after[step][k]), (step, k)
    for step in (1, 2, 3, 5):  # the other steps trained, on finite losses
        assert rec.losses[step + 1] == rec.losses[step + 1]
        assert any(not torch.equal(v, watch.after[step][k]) for k, v in watch.before[step].items() if "weight" in k)
    assert model.model.encoder.use_vq and _all_finite(model.state_dict())
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


# ---------------------------------------------------------------------------------------------- crash and resume
STEPS, EVERY = 8, 2


def _outputs_config(run: Path, stage: str) -> Path:
    """The second ``--config``: every output under ``run``, a CSVLogger logging each step, a checkpoint every
    ``EVERY`` steps, validation once mid-run, the guard and the export (the recipe's callbacks list is replaced)."""
    cfg = {
        "trainer": {
            "default_root_dir": str(run / "root"), "max_steps": STEPS, "precision": "32-true",
            "log_every_n_steps": 1, "val_check_interval": STEPS // 2, "limit_val_batches": 1,
            "enable_model_summary": False, "enable_progress_bar": False,
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                       "init_args": {"save_dir": str(run / "logs"), "name": stage}},
            "callbacks": [
                {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                 "init_args": {"dirpath": str(run / "ckpt"), "save_last": True, "save_top_k": 0,
                               "every_n_train_steps": EVERY}},
                {"class_path": "lit_keomni.guards.NonFiniteGuard"},
                {"class_path": "lit_keomni.checkpoints.Export"},
            ],
        },
        "model": {"init_args": {"export_dir": str(run / "export")}},
    }
    run.mkdir(parents=True, exist_ok=True)
    path = run / "outputs.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def _fit(stage: str, run: Path, args: list[str], *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "lit_keomni", "fit", "--config", str(ROOT / "recipes" / f"{stage}.yaml"),
           "--config", str(_outputs_config(run, stage)), *args, *extra]
    log = open(run / f"log{len(list(run.glob('log*.txt')))}.txt", "w")
    return subprocess.Popen(cmd, cwd=run, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"})


def _finish(proc: subprocess.Popen, run: Path, timeout: float = 240) -> None:
    rc = proc.wait(timeout=timeout)
    log = "".join(p.read_text() for p in sorted(run.glob("log*.txt")))
    assert rc == 0, log[-4000:]


def _losses(run: Path, stage: str) -> dict[int, float]:
    """Per-step ``train/loss`` of the newest CSVLogger version under ``run``."""
    import csv

    versions = sorted((run / "logs" / stage).glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    with open(versions[-1] / "metrics.csv", newline="") as f:
        return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r["train/loss"]}


def _crash_and_resume(stage: str, args: list[str], tmp_path: Path) -> tuple[dict, dict, int]:
    full_run, crash_run = tmp_path / "full", tmp_path / "crash"
    full = _fit(stage, full_run, args)  # the uninterrupted reference, side by side with the crashing run
    crash = _fit(stage, crash_run, args)
    last = crash_run / "ckpt" / "last.ckpt"
    while not last.exists() and crash.poll() is None:
        time.sleep(0.02)
    crash.send_signal(signal.SIGKILL)
    assert crash.wait(timeout=30) == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (crash_run / "export").exists()
    step = torch.load(last, map_location="cpu", weights_only=True)["global_step"]
    assert 0 < step < STEPS
    # what a kill in the middle of a checkpoint write leaves (AtomicCheckpointIO's temp file): never taken for "last"
    (last.parent / ".last.ckpt.k1ll3d").write_bytes(b"PK\x03\x04 half a zip")
    _finish(_fit(stage, crash_run, args, "--ckpt_path", "last"), crash_run)  # the same command, plus --ckpt_path last
    _finish(full, full_run)
    assert (crash_run / "export" / "model.safetensors").is_file()
    return _losses(full_run, stage), _losses(crash_run, stage), step


def _assert_same_after_resume(full: dict, resumed: dict, step: int) -> None:
    assert sorted(full) == list(range(STEPS))
    assert sorted(resumed) == list(range(step, STEPS)), (step, sorted(resumed))
    for s in resumed:  # bit-identical on CPU in float32: same data position, RNG, schedule and VQ state
        assert resumed[s] == full[s], (s, resumed[s], full[s])


STAGE1_ARGS = ["--model.overrides", json.dumps(STAGE1_TINY), "--model.warmup_steps", "2", "--data.batch_size", "4",
               "--data.num_workers", "0"]


def test_stage1_sigkill_then_ckpt_path_last_matches_uninterrupted(prepared, tmp_path):
    args = [*STAGE1_ARGS, "--model.tokenizer", str(prepared / "tokenizer.json"), "--data.data_dir", str(prepared),
            "--model.kmeans_batches", "4", "--model.vq_start", "0.4"]  # VQ on at step 2: the resume crosses the switch
    full, resumed, step = _crash_and_resume("stage1", args, tmp_path)
    _assert_same_after_resume(full, resumed, step)


def test_stage2_sigkill_then_ckpt_path_last_matches_uninterrupted(prepared, stage1_export, tmp_path):
    from lit_keomni.speech_tokens import tokenize
    from tests.test_stage2 import TINY_LM

    tokens = tmp_path / "tokens"  # made once here: two runs side by side must not both build it
    tokenize(stage1_export, prepared, tokens, batch_size=8, workers=1)
    args = ["--model.overrides", json.dumps(TINY_LM), "--model.speech_export", str(stage1_export),
            "--model.warmup_steps", "2", "--model.val_generate_batches", "0",
            "--data.speech_export", str(stage1_export), "--data.tokens_dir", str(tokens),
            "--data.data_dir", str(prepared), "--data.batch_size", "4", "--data.num_workers", "0"]
    full, resumed, step = _crash_and_resume("stage2", args, tmp_path)
    _assert_same_after_resume(full, resumed, step)



def test_truncated_checkpoint_is_one_clear_error(prepared, tmp_path):
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "run" / "ckpt", save_last=True, save_top_k=0,
                                               every_n_train_steps=1)
    model, data, trainer = make(prepared, tmp_path, 1, [ckpt])
    trainer.fit(model, data)
    last = tmp_path / "run" / "ckpt" / "last.ckpt"
    whole = last.read_bytes()
    last.write_bytes(whole[: len(whole) // 2])
    args = [*STAGE1_ARGS, "--model.tokenizer", str(prepared / "tokenizer.json"), "--data.data_dir", str(prepared)]
    for ckpt_path in (str(last), "last"):  # read by LightningCLI for its hparams / by the trainer to restore
        proc = _fit("stage1", tmp_path / "run", args, "--ckpt_path", ckpt_path)
        assert proc.wait(timeout=120) == 1
        out = sorted((tmp_path / "run").glob("log*.txt"))[-1].read_text()
        assert "Traceback" not in out, out[-3000:]
        assert f"error: {last}: cannot load this checkpoint ({len(whole) // 2} bytes), it is probably truncated" in out
    with pytest.raises(CheckpointLoadError, match="checkpoint file not found"):
        AtomicCheckpointIO().load_checkpoint(tmp_path / "nowhere.ckpt")
