"""FSDP2 (``ModelParallelStrategy`` + ``distributed.apply_fsdp``) on CPU with 2 gloo processes.

One ``torch.distributed.run`` launch of this file (``_worker`` below) runs, in both processes:
  1. stage 2 on fixed batches (rank r gets half r of each global batch), float32, with an export;
  2. stage 2 on the real streaming data module in bf16-mixed with the CLI's checkpoint plugin and the recipes'
     NonFiniteGuard, a sharded checkpoint at step 2 and a validation that generates speech tokens and ASR-judges
     them (generation lengths differ per rank: must not deadlock);
  3. a resume of run 2 from its step-2 checkpoint;
  4. stage 1 (VQ switched on mid-run, validation with greedy decoding, export);
  5. ``apply_fsdp`` with activation checkpointing against without, and unequal numbers of eval forwards per rank.
The pytest process runs the single-process reference of 1: the same global batches as two micro-batches with
``accumulate_grad_batches=2``. That is the exact single-device equivalent of data parallelism here: DDP/FSDP average
the ranks' gradients of their *per-rank mean* losses, and Lightning divides each micro-batch loss by 2; one 2b batch
would instead weight every token equally, which differs whenever the halves hold different numbers of speech tokens.
"""

from __future__ import annotations

import json
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


@pytest.fixture(scope="module")
def runs(prepared, stage1_export, tmp_path_factory):
    """The 2-process worker's results (JSON) and the single-process reference, side by side."""
    from lit_keomni.checkpoints import Export
    from lit_keomni.speech_tokens import tokenize

    out = tmp_path_factory.mktemp("fsdp")
    tokens = out / "tokens"
    tokenize(stage1_export, prepared, tokens, workers=1)
    batches = _fixed_batches(tokens, stage1_export)
    torch.save(batches, out / "batches.pt")

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
        log, _ = proc.communicate(timeout=240)
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

    if rank == 0:
        (out / "result.json").write_text(json.dumps(result))


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
