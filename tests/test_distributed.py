"""FSDP2 (``ModelParallelStrategy`` + ``distributed.apply_fsdp``) on CPU with 2 gloo processes.

One ``torch.distributed.run`` launch of this file (``_worker`` below) runs, in both processes:
  1. stage 2 on fixed batches (rank r gets half r of each global batch), float32, with an export;
  2. stage 2 on the real streaming data module in bf16-mixed with the CLI's checkpoint plugin and the recipes'
     NonFiniteGuard, a sharded checkpoint at step 2 and a validation that generates speech tokens and ASR-judges
     them (generation lengths differ per rank: must not deadlock);
  3. a resume of run 2 from its step-2 checkpoint;
  4. stage 1 (VQ switched on mid-run, validation with greedy decoding, export);
  5. ``apply_fsdp`` with activation checkpointing against without, and unequal numbers of eval forwards per rank;
  6. stage 3 on fixed batches of packed rows of all five sources (rank r gets half r), float32, a sharded checkpoint at
     step 2, an export, then a resume from that checkpoint;
  7. stage 4 discrete from the sharded stage-3 export on the SFT data module in bf16-mixed, with an export;
  8. stage 4 continuous (frozen encoder, its own FSDP group) from the same export, with a validation that answers
     each rank's last question greedily through the gathered model, and an export.
The pytest process runs the single-process references of 1 and 6: the same global batches as two micro-batches with
``accumulate_grad_batches=2``. That is the exact single-device equivalent of data parallelism here: DDP/FSDP average
the ranks' gradients of their *per-rank mean* losses, and Lightning divides each micro-batch loss by 2; one 2b batch
would instead weight every token equally, which differs whenever the halves hold different numbers of speech tokens.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
TINY_LM = {"n_layer": 2, "n_embd": 64, "n_head": 4, "n_kv_head": 2, "intermediate_size": 172, "block_size": 512}
MICRO = 3  # examples per rank (per micro-batch in the reference)
STEPS = 4
LR = 3e-3
SEQ3 = 64  # stage-3 packed row length
LORA = {"rank": 4, "alpha": 8.0, "base_dtype": "float32"}


class LossRecorder(L.Callback):
    """Records ``outputs["loss"]``, the global step and the last logged gradient norm after every training batch."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.steps: list[int] = []
        self.grad_norms: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))
        self.steps.append(trainer.global_step)
        self.grad_norms.append(float(trainer.callback_metrics.get("train/grad_norm", float("nan"))))


def _stage2(stage1_export: Path, out: Path, **kw):
    from lit_keomni.stages.text_to_token import TextToToken

    args = {"warmup_steps": 2, "lr": LR, "val_generate_batches": 1, "export_dir": str(out), **kw}
    return TextToToken(config="tiny", overrides=TINY_LM, speech_export=str(stage1_export), **args)


def _trainer(root: Path, callbacks: list, *, strategy="auto", devices=1, **kw):
    # gradient norms here are ~2.5: clipping at 1 is active, so the sharded norm must be the whole gradient's
    args = dict(accelerator="cpu", devices=devices, strategy=strategy, max_steps=STEPS, logger=False,
                gradient_clip_val=1.0, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                limit_val_batches=0, default_root_dir=str(root), callbacks=callbacks)
    return L.Trainer(**{**args, **kw})


def _fixed_batches(tokens: Path, stage1_export: Path) -> list[list[dict]]:
    """STEPS global batches of 2 · MICRO examples, in the data's stored order."""
    from litdata import StreamingDataset

    from datamodules.text_to_token import TTSExample

    ds = StreamingDataset(str(tokens / "chunks" / "train"), shuffle=False, transform=TTSExample(str(stage1_export)))
    n = 2 * MICRO
    examples = [ds[i] for i in range(STEPS * n)]
    return [examples[k * n : (k + 1) * n] for k in range(STEPS)]


def _loader(batches: list):
    from torch.utils.data import DataLoader

    from datamodules.text_to_token import tts_collate

    return DataLoader([tts_collate(b) for b in batches], batch_size=None, collate_fn=lambda b: b)


class FixedBatches:
    """Already collated batches in order, resumable: Lightning keeps ``state_dict`` (batches taken this epoch) in
    checkpoints and hands it back to ``load_state_dict`` on resume, as it does for a ``StreamingDataLoader``."""

    def __init__(self, batches: list[dict]) -> None:
        self.batches, self.taken = batches, 0

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        while self.taken < len(self.batches):
            self.taken += 1
            yield self.batches[self.taken - 1]
        self.taken = 0

    def state_dict(self) -> dict:
        return {"taken": self.taken}

    def load_state_dict(self, state: dict) -> None:
        self.taken = int(state["taken"])


def _stage3(stage1_export: Path, out: Path | None, **kw):
    from lit_keomni.stages.pretrain import Pretrain

    args = {"warmup_steps": 2, "lr": LR, "export_dir": str(out) if out else None, **kw}
    return Pretrain(config="tiny", overrides=TINY_LM, speech_export=str(stage1_export), **args)


def _lora_base(stage1_export: Path, out: Path) -> None:
    """A random tiny LM as an LM export: the frozen base of the LoRA runs."""
    from lit_keomni.checkpoints import lm_tokenizer, write_export
    from lit_keomni.configs import TransformerConfig, config_dict
    from lit_keomni.nn.transformer import Transformer

    tok, meta = lm_tokenizer(stage1_export)
    torch.manual_seed(11)
    lm = Transformer(TransformerConfig.from_name("tiny", **TINY_LM).replace(vocab_size=tok.vocab_size))
    write_export(out, kind="speech_lm", config=config_dict(lm.config), state_dict=lm.state_dict(),
                 extra={"speech_tokenizer": {k: meta[k] for k in ("frame_rate_hz", "codebook_size")}},
                 files={"tokenizer": tok.save})


def _stage3_batches(prepared: Path, stage1_export: Path, tokens: Path, interleaved: Path) -> list[list[dict]]:
    """STEPS global batches of 2 · MICRO packed rows (``datamodules.pretrain.pack_source`` of real items of each
    source), the five sources taking turns row by row, so the two ranks' halves hold different sets of sources."""
    from itertools import islice

    from litdata import StreamingDataset

    from datamodules.pretrain import SOURCES, pack_source
    from lit_keomni.checkpoints import lm_tokenizer
    from lit_keomni.interleave import read_documents

    def first(path: Path, n: int) -> list[dict]:
        ds = StreamingDataset(str(path))
        return [ds[i] for i in range(min(n, len(ds)))]

    tok, _ = lm_tokenizer(stage1_export)
    utterances = first(tokens / "chunks" / "train", 24)
    items = {"text": [{"text": t} for _, t in islice(read_documents(prepared / "text" / "toy_world.jsonl"), 40)],
             "interleaved": first(interleaved / "chunks", 24), "speech": utterances, "asr": utterances,
             "tts": utterances}
    n = 2 * MICRO
    per_source = -(-STEPS * n // len(SOURCES))
    rows = {s: pack_source(s, items[s], tok, SEQ3)[:per_source] for s in SOURCES}
    short = {s: len(r) for s, r in rows.items() if len(r) < per_source}
    assert not short, f"too few packed rows {short}, need {per_source} per source"
    order = [rows[SOURCES[j % len(SOURCES)]][j // len(SOURCES)] for j in range(STEPS * n)]
    return [order[k * n : (k + 1) * n] for k in range(STEPS)]


def _sft_data(mode: str, prepared: str | Path, stage1_export: str | Path, tokens: str | Path, out: Path):
    """The SFT data module over the tiny corpus; continuous with batches of 1: its val split has only 2 dialogues,
    one per rank."""
    from datamodules.sft import SFTDataModule

    return SFTDataModule(mode=mode, speech_export=str(stage1_export), tokens_dir=str(tokens), sft_dir=str(out / "sft"),
                         data_dir=str(prepared), batch_size=2 if mode == "discrete" else 1, num_workers=0,
                         max_length=512)


@pytest.fixture(scope="module")
def runs(prepared, stage1_export, speech_tokens, interleaved, tmp_path_factory):
    """The 2-process worker's results (JSON) and the single-process references, side by side."""
    from datamodules.pretrain import pretrain_collate
    from lit_keomni.checkpoints import Export

    out = tmp_path_factory.mktemp("fsdp")
    tokens = speech_tokens  # read only
    batches = _fixed_batches(tokens, stage1_export)
    torch.save(batches, out / "batches.pt")
    stage3 = _stage3_batches(prepared, stage1_export, tokens, interleaved)
    torch.save(stage3, out / "stage3_batches.pt")
    for mode in ("discrete", "continuous"):  # built here once, so the workers only read them
        _sft_data(mode, prepared, stage1_export, tokens, out).prepare_data()
    _lora_base(stage1_export, out / "lora_base")

    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "tests.test_distributed", str(prepared), str(stage1_export), str(tokens), str(out)]
    # its own process group, so a hang can be ended with the workers torchrun started
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        # The reference runs meanwhile (it needs nothing from the workers).
        L.seed_everything(5)
        rec = LossRecorder()
        model = _stage2(stage1_export, out / "single_export")
        trainer = _trainer(out / "single", [rec, Export()], accumulate_grad_batches=2)
        micro = [half for b in batches for half in (b[:MICRO], b[MICRO:])]
        trainer.fit(model, train_dataloaders=_loader(micro))

        L.seed_everything(5)
        rec3 = LossRecorder()
        model3 = _stage3(stage1_export, out / "stage3_single_export")
        trainer = _trainer(out / "stage3_single", [rec3, Export()], accumulate_grad_batches=2)
        trainer.fit(model3, train_dataloaders=FixedBatches(
            [pretrain_collate(half) for b in stage3 for half in (b[:MICRO], b[MICRO:])]))

        L.seed_everything(5)
        rec_lora = LossRecorder()
        model_lora = _stage3(stage1_export, out / "lora_single_export", init_from=str(out / "lora_base"), lora=LORA)
        trainer = _trainer(out / "lora_single", [rec_lora, Export()], accumulate_grad_batches=2)
        trainer.fit(model_lora, train_dataloaders=FixedBatches(
            [pretrain_collate(half) for b in stage3 for half in (b[:MICRO], b[MICRO:])]))
        log, _ = proc.communicate(timeout=420)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        pytest.fail(f"2-process worker timed out (a collective deadlock?):\n{log[-6000:]}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, log[-8000:]
    result = json.loads((out / "result.json").read_text())
    # accumulation: each micro-batch's recorded loss is already divided by 2, so a step's loss is their sum
    result["single_losses"] = [a + b for a, b in zip(rec.losses[::2], rec.losses[1::2])]
    result["single_grad_norms"] = rec.grad_norms[1::2]
    result["stage3_single_losses"] = [a + b for a, b in zip(rec3.losses[::2], rec3.losses[1::2])]
    result["stage3_single_grad_norms"] = rec3.grad_norms[1::2]
    result["stage3_single_seen_tokens"] = model3.seen_tokens.tolist()
    result["lora_single_losses"] = [a + b for a, b in zip(rec_lora.losses[::2], rec_lora.losses[1::2])]
    seen = [0] * 5  # real tokens per source in all rows, as Pretrain counts them
    for row in (r for b in stage3 for r in b):
        seen[int(row["source"])] += int((row["document"][:-1] >= 0).sum())
    result["stage3_expected_seen_tokens"] = seen
    result["out"] = str(out)
    return result


def test_sharded_losses_match_single_process(runs):
    ranks = runs["fixed_losses"]  # [rank][step]
    sharded = [(a + b) / 2 for a, b in zip(*ranks)]
    assert len(sharded) == STEPS == len(runs["single_losses"])
    assert sharded[0] == pytest.approx(runs["single_losses"][0], rel=1e-6)  # same initial weights on every rank
    assert sharded == pytest.approx(runs["single_losses"], rel=1e-5)
    assert ranks[0] != ranks[1]  # the ranks really saw different halves
    # the logged gradient norm is the norm of the whole (sharded) gradient, as on one device
    assert runs["fixed_grad_norms"] == pytest.approx(runs["single_grad_norms"], rel=1e-5)


def test_sharded_export_is_one_full_folder_equal_to_single_process(runs):
    from lit_keomni.checkpoints import load_text_to_token

    out = Path(runs["out"])
    sharded, tok, _ = load_text_to_token(out / "fixed_export")
    single, _, _ = load_text_to_token(out / "single_export")
    a, b = sharded.state_dict(), single.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)  # measured: bitwise equal


def test_sharded_checkpoint_resumes_with_identical_losses(runs):
    out = Path(runs["out"])
    assert (out / "ckpt" / "step=2.ckpt").is_dir()  # a distributed (sharded) checkpoint folder
    full, resumed = runs["stream_losses"], runs["resumed_losses"]
    for rank in range(2):
        assert resumed[rank]["steps"] == [3, 4]
        assert resumed[rank]["losses"] == pytest.approx(full[rank]["losses"][2:], rel=1e-5), rank


def test_sharded_validation_generates_and_judges(runs):
    metrics = runs["stream_metrics"]
    assert "val/loss" in metrics and ("val/generated_cer" in metrics or "val/generated_wer" in metrics), metrics


def test_stage1_sharded_fit_exports_and_keeps_codebooks_identical(runs):
    from lit_keomni.checkpoints import load_speech_tokenizer

    s1 = runs["stage1"]
    assert s1["vq_active"] and s1["codebooks_equal"]
    assert "val/cer" in s1["metrics"] or "val/wer" in s1["metrics"], s1["metrics"]
    model, tok, meta = load_speech_tokenizer(Path(runs["out"]) / "stage1_export")
    assert meta["vq_active"] and model.encoder.use_vq
    torch.testing.assert_close(model.encoder.quantizer.codebook, torch.tensor(s1["codebook"]))


def test_activation_checkpointing_and_unequal_eval_forwards(runs):
    ac = runs["activation_checkpointing"]
    assert ac["same_keys"] and ac["max_grad_diff"] < 1e-6, ac
    assert ac["trained_after_eval"]


def test_stage3_sharded_losses_match_single_process(runs):
    s3 = runs["stage3"]
    ranks = s3["losses"]  # [rank][step]
    sharded = [(a + b) / 2 for a, b in zip(*ranks)]
    assert len(sharded) == STEPS == len(runs["stage3_single_losses"])
    assert sharded == pytest.approx(runs["stage3_single_losses"], rel=1e-5)
    assert ranks[0] != ranks[1]
    assert s3["grad_norms"] == pytest.approx(runs["stage3_single_grad_norms"], rel=1e-5)
    # the mixture counts sum both ranks' rows: every real token of the global batches, once
    assert s3["seen_tokens"] == runs["stage3_single_seen_tokens"] == runs["stage3_expected_seen_tokens"]


def test_stage3_sharded_checkpoint_resumes_with_identical_losses(runs):
    s3 = runs["stage3"]
    assert (Path(runs["out"]) / "stage3_ckpt" / "step=2.ckpt").is_dir()
    for rank in range(2):
        assert s3["resumed_steps"][rank] == [3, 4]
        assert s3["resumed_losses"][rank] == pytest.approx(s3["losses"][rank][2:], rel=1e-5), rank
    assert s3["resumed_seen_tokens"] == s3["seen_tokens"]  # the consumed-mixture counts survive the resume


def test_stage3_sharded_export_equals_single_process(runs):
    from lit_keomni.checkpoints import load_lm

    out = Path(runs["out"])
    sharded, tok, meta = load_lm(out / "stage3_fixed_export", "speech_lm")
    single, _, _ = load_lm(out / "stage3_single_export", "speech_lm")
    assert meta["stage"] == "pretrain" and tok.num_audio_tokens == 16
    a, b = sharded.state_dict(), single.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        # Adam divides by the root of the squared gradient: on an embedding row whose gradient is tiny, the summation
        # order of two ranks against one (float32 rounding) moves a weight by up to a few 1e-6 in 4 steps
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=5e-6, msg=k)


def test_lora_sharded_matches_single_process_and_resumes(runs):
    from lit_keomni.checkpoints import load_lm

    lora = runs["lora"]
    sharded = [(a + b) / 2 for a, b in zip(*lora["losses"])]
    assert len(sharded) == STEPS and sharded == pytest.approx(runs["lora_single_losses"], rel=1e-5)
    for rank in range(2):
        assert lora["resumed_steps"][rank] == [3, 4]
        assert lora["resumed_losses"][rank] == pytest.approx(lora["losses"][rank][2:], rel=1e-5), rank
    out = Path(runs["out"])
    a, _, meta = load_lm(out / "lora_export", "speech_lm")
    b, _, _ = load_lm(out / "lora_single_export", "speech_lm")
    base, _, _ = load_lm(out / "lora_base", "speech_lm")
    assert meta["lora_merged"]["rank"] == 4
    for k, v in a.state_dict().items():
        torch.testing.assert_close(v, b.state_dict()[k], rtol=1e-5, atol=1e-6, msg=k)
    assert not torch.equal(a.blocks[0].attn.q_proj.weight, base.blocks[0].attn.q_proj.weight)
    assert torch.equal(a.embed.weight, base.embed.weight)  # frozen


def test_stage4_discrete_sharded_fit_exports_one_loadable_speech_lm(runs):
    from lit_keomni.checkpoints import load_lm

    s4 = runs["sft_discrete"]
    assert s4["steps"] == [1, 2] and all(map(math.isfinite, s4["losses"][0] + s4["losses"][1])), s4
    model, tok, meta = load_lm(Path(runs["out"]) / "sft_discrete_export", "speech_lm")
    assert meta["stage"] == "sft" and meta["template"] == "text_guided" and tok.num_audio_tokens == 16
    stage3, _, _ = load_lm(Path(runs["out"]) / "stage3_fixed_export", "speech_lm")
    assert model.state_dict().keys() == stage3.state_dict().keys()
    assert not torch.equal(model.embed.weight, stage3.embed.weight)  # started from stage 3 and trained


def test_stage4_continuous_sharded_keeps_the_encoder_frozen(runs, stage1_export):
    from lit_keomni.checkpoints import load_keomni
    from lit_keomni.stages.sft import load_speech_encoder

    s4 = runs["sft_continuous"]
    assert s4["steps"] == [1, 2] and all(map(math.isfinite, s4["losses"][0] + s4["losses"][1])), s4
    assert s4["encoder_grads"] == [False, False] and s4["adapter_grads"] == [True, True]
    assert "val/answer_cer" in s4["metrics"], s4["metrics"]
    model, _, meta = load_keomni(Path(runs["out"]) / "sft_continuous_export")
    assert meta["kind"] == "keomni_lm"
    frozen = load_speech_encoder(stage1_export).state_dict()
    for k, v in model.encoder.state_dict().items():
        torch.testing.assert_close(v, frozen[k], rtol=0, atol=0, msg=k)


# ------------------------------------------------------------------------------------------------ the worker


def _worker(prepared: str, stage1_export: str, tokens: str, out_dir: str) -> None:
    import torch.distributed as dist
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.strategies import ModelParallelStrategy

    from datamodules.text_to_token import TextToTokenDataModule
    from datamodules.tokenizer import TokenizerDataModule
    from lit_keomni.checkpoints import AtomicCheckpointIO, Export
    from lit_keomni.guards import NonFiniteGuard
    from lit_keomni.stages.tokenizer import SpeechTokenizer
    from tests.conftest import STAGE1_TINY

    out = Path(out_dir)
    rank = int(os.environ["RANK"])

    def strategy():
        return ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)

    def gather(obj):
        objs: list = [None, None]
        dist.all_gather_object(objs, obj)
        return objs

    result: dict = {}
    # 1. fixed batches, float32
    batches = torch.load(out / "batches.pt", weights_only=False)
    L.seed_everything(5)
    rec = LossRecorder()
    trainer = _trainer(out / "fixed", [rec, Export()], strategy=strategy(), devices=2, use_distributed_sampler=False)
    trainer.fit(_stage2(Path(stage1_export), out / "fixed_export"),
                train_dataloaders=_loader([b[rank * MICRO : (rank + 1) * MICRO] for b in batches]))
    result["fixed_losses"] = gather(rec.losses)
    result["fixed_grad_norms"] = rec.grad_norms

    # 2. streaming data, bf16-mixed, sharded checkpoint at step 2, validation with generation + ASR judge
    def stream(callbacks, ckpt_path=None):
        L.seed_everything(5)
        data = TextToTokenDataModule(speech_export=stage1_export, tokens_dir=tokens, data_dir=prepared, batch_size=2,
                                     num_workers=0)
        trainer = _trainer(out / "stream", callbacks, strategy=strategy(), devices=2, precision="bf16-mixed",
                           plugins=[AtomicCheckpointIO()],  # as the CLI adds
                           limit_val_batches=2, val_check_interval=STEPS, check_val_every_n_epoch=None)
        trainer.fit(_stage2(Path(stage1_export), out / "stream_export"), data, ckpt_path=ckpt_path)
        return trainer

    rec = LossRecorder()
    ckpt = ModelCheckpoint(dirpath=out / "ckpt", filename="{step}", every_n_train_steps=2, save_top_k=-1)
    trainer = stream([rec, ckpt, NonFiniteGuard()])  # as recipes/paper: its gradient check reads DTensor shards
    result["stream_losses"] = gather({"steps": rec.steps, "losses": rec.losses})
    result["stream_metrics"] = sorted(trainer.callback_metrics)

    # 3. resume from the step-2 checkpoint
    rec = LossRecorder()
    stream([rec], ckpt_path=str(out / "ckpt" / "step=2.ckpt"))
    result["resumed_losses"] = gather({"steps": rec.steps, "losses": rec.losses})

    # 4. stage 1: VQ on after step 1, validation decodes greedily, export
    L.seed_everything(3)
    model = SpeechTokenizer(config="tiny", overrides=STAGE1_TINY, tokenizer=str(Path(prepared) / "tokenizer.json"),
                            warmup_steps=2, vq_start=0.34, kmeans_batches=2, val_decode_batches=1,
                            export_dir=str(out / "stage1_export"))
    data = TokenizerDataModule(data_dir=prepared, batch_size=2, num_workers=0)
    trainer = _trainer(out / "stage1", [NonFiniteGuard(), Export()], strategy=strategy(), devices=2,
                       max_steps=3, precision="bf16-mixed",
                       limit_val_batches=1, val_check_interval=3, check_val_every_n_epoch=None)
    trainer.fit(model, data)
    codebooks = gather(model.model.encoder.quantizer.codebook.tolist())
    result["stage1"] = {"vq_active": bool(model.model.encoder.use_vq), "codebooks_equal": codebooks[0] == codebooks[1],
                        "codebook": codebooks[0], "metrics": sorted(trainer.callback_metrics)}

    # 5. apply_fsdp directly: activation checkpointing changes neither keys nor gradients; unequal eval forwards
    result["activation_checkpointing"] = _check_apply_fsdp(rank)

    # 6. stage 3 on fixed packed rows, float32: sharded checkpoint at step 2, export; a resume from step 2
    from datamodules.pretrain import pretrain_collate

    halves = [pretrain_collate(b[rank * MICRO : (rank + 1) * MICRO]) for b in torch.load(out / "stage3_batches.pt",
                                                                                          weights_only=False)]

    def pretrain(callbacks, export=None, ckpt_path=None):
        L.seed_everything(5)
        model = _stage3(Path(stage1_export), export)
        trainer = _trainer(out / "stage3", callbacks, strategy=strategy(), devices=2, use_distributed_sampler=False,
                           plugins=[AtomicCheckpointIO()])
        trainer.fit(model, train_dataloaders=FixedBatches(halves), ckpt_path=ckpt_path)
        return model

    rec = LossRecorder()
    ckpt = ModelCheckpoint(dirpath=out / "stage3_ckpt", filename="{step}", every_n_train_steps=2, save_top_k=-1)
    model = pretrain([rec, ckpt, Export()], export=out / "stage3_fixed_export")
    stage3 = {"losses": gather(rec.losses), "grad_norms": rec.grad_norms, "seen_tokens": model.seen_tokens.tolist()}
    rec = LossRecorder()
    model = pretrain([rec], ckpt_path=str(out / "stage3_ckpt" / "step=2.ckpt"))
    stage3.update(resumed_losses=gather(rec.losses), resumed_steps=gather(rec.steps),
                  resumed_seen_tokens=model.seen_tokens.tolist())
    result["stage3"] = stage3

    # 9. stage 3 with LoRA on a fixed base, the same rows: adapters sharded with their blocks, a sharded checkpoint
    # (the adapters only) at step 2, an export with them merged; a resume from step 2
    def lora_pretrain(callbacks, export=None, ckpt_path=None):
        L.seed_everything(5)
        model = _stage3(Path(stage1_export), export, init_from=str(out / "lora_base"), lora=LORA)
        trainer = _trainer(out / "lora", callbacks, strategy=strategy(), devices=2, use_distributed_sampler=False,
                           plugins=[AtomicCheckpointIO()])
        trainer.fit(model, train_dataloaders=FixedBatches(halves), ckpt_path=ckpt_path)

    rec = LossRecorder()
    ckpt = ModelCheckpoint(dirpath=out / "lora_ckpt", filename="{step}", every_n_train_steps=2, save_top_k=-1)
    lora_pretrain([rec, ckpt, Export()], export=out / "lora_export")
    lora = {"losses": gather(rec.losses)}
    rec = LossRecorder()
    lora_pretrain([rec], ckpt_path=str(out / "lora_ckpt" / "step=2.ckpt"))
    lora.update(resumed_losses=gather(rec.losses), resumed_steps=gather(rec.steps))
    result["lora"] = lora

    # 7, 8. stage 4 from the sharded stage-3 export, bf16-mixed: discrete; continuous with validation answers
    for mode in ("discrete", "continuous"):
        result[f"sft_{mode}"] = _sft(mode, prepared, stage1_export, tokens, out, strategy(), gather)

    if rank == 0:
        (out / "result.json").write_text(json.dumps(result))


class _Grads(L.Callback):
    """Whether the encoder's and the adapter's parameters got gradients (continuous SFT)."""

    def __init__(self) -> None:
        self.encoder: list[bool] = []
        self.adapter: list[bool] = []

    def on_after_backward(self, trainer, pl_module) -> None:
        self.encoder.append(any(p.grad is not None for p in pl_module.model.encoder.parameters()))
        self.adapter.append(all(p.grad is not None for p in pl_module.model.adapter.parameters()))


def _sft(mode: str, prepared: str, stage1_export: str, tokens: str, out: Path, strategy, gather) -> dict:
    from lit_keomni.checkpoints import Export
    from lit_keomni.stages.sft import SFT

    L.seed_everything(5)
    model = SFT(mode=mode, config="tiny", overrides=TINY_LM, init_from=str(out / "stage3_fixed_export"),
                speech_export=stage1_export, encoder_from=stage1_export, warmup_steps=1, lr=LR, max_answer_tokens=4,
                export_dir=str(out / f"sft_{mode}_export"))
    rec, grads = LossRecorder(), _Grads()
    callbacks = [rec, Export()] + ([grads] if mode == "continuous" else [])
    trainer = _trainer(out / f"sft_{mode}", callbacks, strategy=strategy, devices=2, max_steps=2,
                       precision="bf16-mixed", limit_val_batches=int(mode == "continuous"), val_check_interval=2,
                       check_val_every_n_epoch=None)
    trainer.fit(model, _sft_data(mode, prepared, stage1_export, tokens, out))
    return {"steps": rec.steps, "losses": gather(rec.losses), "metrics": sorted(trainer.callback_metrics),
            "encoder_grads": grads.encoder, "adapter_grads": grads.adapter}


def _check_apply_fsdp(rank: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    from lit_keomni.configs import TransformerConfig
    from lit_keomni.distributed import apply_fsdp, full_state_dict
    from lit_keomni.nn.transformer import Transformer

    mesh = init_device_mesh("cpu", (2,))
    config = TransformerConfig.from_name("tiny")
    models, grads = [], []
    for ac in (False, True):
        torch.manual_seed(0)
        m = Transformer(config)
        keys = list(m.state_dict())
        apply_fsdp(m, mesh, blocks=m.blocks, param_dtype=None, activation_checkpointing=ac)
        x = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(rank))
        m(x).float().logsumexp(-1).mean().backward()
        grads.append({n: p.grad.full_tensor() for n, p in m.named_parameters()})
        models.append(m)
    full = full_state_dict(models[1])  # a collective: every rank calls it, rank 0 gets the tensors
    same_keys = list(full) == keys if rank == 0 else True
    diff = max(float((grads[1][n] - grads[0][n.replace("_checkpoint_wrapped_module.", "")]).abs().max())
               for n in grads[1])
    # eval: rank 0 runs 1 forward, rank 1 runs 3 (as greedy decoding would); then one training step on both
    m = models[0].eval()
    with torch.no_grad():
        for _ in range(1 + 2 * rank):
            m(torch.randint(0, 512, (1, 8)))
    m.train()
    m(torch.randint(0, 512, (2, 8))).float().mean().backward()
    return {"same_keys": same_keys, "max_grad_diff": diff, "trained_after_eval": True}


if __name__ == "__main__":
    _worker(*sys.argv[1:])
