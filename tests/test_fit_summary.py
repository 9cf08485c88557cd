"""``fit`` ends by printing the figures a user came for, and its progress bar counts steps of ``max_steps``."""

import sys
from pathlib import Path

from lit_keomni.cli import KeOmniCLI, StepProgressBar
from tests.conftest import STAGE1_TINY
from tests.test_sources import make_folder

ROOT = Path(__file__).resolve().parent.parent


def test_stage1_fit_prints_final_validation_export_and_counts_steps(tmp_path, monkeypatch, capsys):
    from datamodules.streaming import prepare

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lit_keomni"])
    data = tmp_path / "data"
    prepare(data, make_folder(tmp_path / "corpus"), format="folder", workers=1, tokenizer_vocab=60, val_fraction=0.3)
    overrides = ",".join(f"{k}: {v}" for k, v in STAGE1_TINY.items())
    cli = KeOmniCLI(args=["fit", "--config", str(ROOT / "recipes" / "stage1.yaml"),
                          "--data.init_args.data_dir", str(data), "--data.init_args.batch_size", "2",
                          "--data.init_args.num_workers", "0", "--model.init_args.tokenizer", str(data / "tokenizer.json"),
                          "--model.init_args.overrides", "{" + overrides + "}", "--model.init_args.warmup_steps", "1",
                          "--model.init_args.kmeans_batches", "1", "--trainer.max_steps", "3",
                          "--trainer.val_check_interval", "3", "--trainer.limit_val_batches", "1"])
    printed = capsys.readouterr().out
    assert "fit finished: step 3/3" in printed
    assert "final validation (at step 3):" in printed and "val/loss" in printed and "val/cer" in printed
    assert "export: checkpoints/stage1/export" in printed and (tmp_path / "checkpoints/stage1/export").is_dir()
    assert "last checkpoint: " in printed
    bar = next(c for c in cli.trainer.callbacks if isinstance(c, StepProgressBar))
    assert bar._get_train_description(cli.trainer.current_epoch).startswith("Step 3/3 · epoch ")
    task = bar.progress.tasks[bar.train_progress_bar_id] if bar.progress is not None else None
    assert task is None or (task.total, task.completed) == (3, 3)
