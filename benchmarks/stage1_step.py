"""Where a stage-1 training step spends its time, phase by phase, on the recipe's model and data.

    python benchmarks/stage1_step.py [--config recipes/stage1_asr.yaml] [--steps 30] [--warmup 5]

Builds the recipe's ``SpeechTokenizer`` and its DataModule (``data/builtin`` by default, built if missing) and runs a
plain loop that times each phase of one optimiser step: waiting for the loader, the log-mel front end, SpecAugment,
forward + losses, backward, gradient clipping + the AdamW step. The same number of steps then runs under
``Trainer.fit`` with the recipe's callbacks and logger, so the difference is Lightning's and the callbacks' share.
Last, one validation batch is timed: its loss and its greedy attention decoding (what ``val_decode_batches`` costs).
Figures: median (and mean) milliseconds per step; the load average is printed beside them.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import load_line, machine_line  # noqa: E402


def build(config_path: str, data_dir: str | None):
    import importlib

    cfg = yaml.safe_load(Path(config_path).read_text())

    def make(section):
        mod, cls = section["class_path"].rsplit(".", 1)
        return getattr(importlib.import_module(mod), cls)(**(section.get("init_args") or {}))

    if data_dir:
        cfg["data"]["init_args"]["data_dir"] = data_dir
        cfg["model"]["init_args"]["tokenizer"] = str(Path(data_dir) / "tokenizer.json")
    cfg["model"]["init_args"]["export_dir"] = None
    return cfg, make


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="recipes/stage1_asr.yaml")
    ap.add_argument("--data", default=None, help="prepared corpus (default: the recipe's data_dir)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--no-trainer", action="store_true", help="only the plain loop")
    ap.add_argument("--keep-denormals", action="store_true", help="leave torch.set_flush_denormal off")
    ap.add_argument("--precision", default=None, help="override the recipe's trainer.precision (32-true, bf16-mixed)")
    args = ap.parse_args()

    import lightning as L

    cfg, make = build(args.config, args.data)
    torch.set_flush_denormal(not args.keep_denormals)
    if args.precision:
        cfg["trainer"]["precision"] = args.precision
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg["trainer"].get("precision") == "bf16-mixed")
    L.seed_everything(1234, verbose=False)
    dm = make(cfg["data"])
    dm.prepare_data()
    dm.setup("fit")
    module = make(cfg["model"])
    module.configure_model()
    module.train()
    model = module.model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    clip = float(cfg["trainer"].get("gradient_clip_val") or 0)
    print(machine_line(torch.device("cpu")))
    print(f"recipe {args.config}: {sum(p.numel() for p in model.parameters()):,} parameters, batch "
          f"{dm.batch_size}, precision {cfg['trainer'].get('precision')}, {args.steps} steps after {args.warmup} "
          f"warm-up | {load_line()}")

    phases = ["loader", "logmel", "specaug", "forward+loss", "backward", "clip+step"]
    times: dict[str, list[float]] = {p: [] for p in phases}
    audio_s: list[float] = []
    it = iter(dm.train_dataloader())
    for step in range(args.warmup + args.steps):
        t = [time.perf_counter()]
        batch = next(it)
        t.append(time.perf_counter())
        mel, mel_lengths = module.logmel(batch["audio"], batch["audio_lengths"])
        t.append(time.perf_counter())
        if module.hparams.spec_augment:
            from lit_keomni.stages.tokenizer import spec_augment
            mel = spec_augment(mel, mel_lengths, module.aug_gen, 2, 10, 2, 25)
        t.append(time.perf_counter())
        with autocast:
            loss = module._loss_from_mel(batch, mel, mel_lengths)["loss"]
        t.append(time.perf_counter())
        loss.backward()
        t.append(time.perf_counter())
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        t.append(time.perf_counter())
        if step >= args.warmup:
            for p, a, b in zip(phases, t, t[1:]):
                times[p].append(b - a)
            audio_s.append(float(batch["audio_lengths"].sum()) / 16000)
    med = {p: statistics.median(v) * 1000 for p, v in times.items()}
    total = sum(statistics.median([sum(x) for x in zip(*times.values())]) for _ in [0]) * 1000
    print(f"\nplain loop, median ms per step (audio per batch {statistics.median(audio_s):.1f} s):")
    for p in phases:
        print(f"  {p:<14} {med[p]:8.1f}  ({med[p] / total:5.1%})")
    print(f"  {'total':<14} {total:8.1f}  -> {statistics.median(audio_s) / (total / 1000):.0f} audio s per s")
    steps_s = [sum(x) for x in zip(*times.values())]
    print(f"  mean {1000 * statistics.mean(steps_s):.1f} ms per step over {len(steps_s)} steps, "
          f"{sum(audio_s) / sum(steps_s):.0f} audio s per s (bucketed batches differ in length: the mean is the cost)")

    # one validation batch: loss, then greedy decoding
    module.eval()
    val = next(iter(dm.val_dataloader()))
    with torch.no_grad():
        t0 = time.perf_counter()
        mel, mel_lengths = module.logmel(val["audio"], val["audio_lengths"])
        out = module._loss_from_mel(val, mel, mel_lengths)
        t1 = time.perf_counter()
        tok = module.text_tokenizer
        module.model.transcribe(mel, mel_lengths, [tok.bos_id], tok.eos_id, max_tokens=out["_tokens"].shape[1] + 10)
        t2 = time.perf_counter()
    print(f"\nvalidation batch of {len(val['text'])}: loss {1000 * (t1 - t0):.0f} ms, greedy decoding "
          f"{1000 * (t2 - t1):.0f} ms")

    if args.no_trainer:
        return

    with tempfile.TemporaryDirectory() as tmp:
        tcfg = dict(cfg["trainer"])
        callbacks = [make(c) for c in tcfg.pop("callbacks", []) if "ModelCheckpoint" not in c["class_path"]
                     and "Export" not in c["class_path"]]
        logger = tcfg.pop("logger", None)
        if logger:
            logger["init_args"]["save_dir"] = tmp
            logger = make(logger)
        tcfg.update(max_steps=args.warmup + args.steps, val_check_interval=None, limit_val_batches=0,
                    default_root_dir=tmp, enable_checkpointing=False)
        tcfg.pop("check_val_every_n_epoch", None)
        L.seed_everything(1234, verbose=False)
        module = make(cfg["model"])
        stamps: list[float] = []

        class Stamp(L.Callback):
            def on_train_batch_end(self, *a, **k):
                stamps.append(time.perf_counter())

        trainer = L.Trainer(callbacks=[*callbacks, Stamp()], logger=logger, enable_model_summary=False, **tcfg)
        trainer.fit(module, datamodule=dm)
        steps = [b - a for a, b in zip(stamps, stamps[1:])][args.warmup - 1:]
        fit_ms = statistics.median(steps) * 1000
        print(f"\nTrainer.fit with the recipe's callbacks and logger: {fit_ms:.1f} ms per step "
              f"({fit_ms - total:+.1f} ms beside the plain loop), mean {1000 * statistics.mean(steps):.1f} | "
              f"{load_line()}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
