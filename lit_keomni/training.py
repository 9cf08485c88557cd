"""Pieces every stage's LightningModule shares: AdamW with warm-up and decay, RNG state for exact resume,
gradient-norm logging, and a token-throughput / MFU callback."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Iterable
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import Tensor, nn

from lit_keomni.audio import SAMPLE_RATE


def adamw_with_schedule(
    named_parameters: Iterable[tuple[str, nn.Parameter]],
    *,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    warmup_steps: int,
    total_steps: int,
    min_lr_ratio: float,
    decay: str = "cosine",
) -> dict[str, Any]:
    """AdamW (no decay on norms, biases and embeddings) with linear warm-up, then cosine or linear decay to
    ``min_lr_ratio · lr`` at ``total_steps``; in the form ``configure_optimizers`` returns."""
    if decay not in ("cosine", "linear"):
        raise ValueError(f"decay={decay!r}: expected 'cosine' or 'linear'")
    params = [(n, p) for n, p in named_parameters if p.requires_grad]
    decayed = [p for n, p in params if p.ndim >= 2 and "embed" not in n]
    plain = [p for n, p in params if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decayed, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}],
                            lr=lr, betas=betas)
    total = max(1, total_steps)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        t = min(1.0, (step - warmup_steps) / max(1, total - warmup_steps))
        shape = 0.5 * (1 + math.cos(math.pi * t)) if decay == "cosine" else 1 - t
        return min_lr_ratio + (1 - min_lr_ratio) * shape

    return {"optimizer": opt,
            "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.LambdaLR(opt, factor), "interval": "step"}}


def rng_state() -> dict[str, Any]:
    """Global RNG states in a form ``torch.load(weights_only=True)`` accepts (tensors, not numpy arrays)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos, "has_gauss": has_gauss,
                  "gauss": gauss},
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    random.setstate(state["python"])


def grad_norm(module: nn.Module) -> torch.Tensor | None:
    norms = [p.grad.detach().float().norm() for p in module.parameters() if p.grad is not None]
    return torch.stack(norms).norm() if norms else None


def gather_lists(values: dict[str, list]) -> dict[str, list]:
    """Concatenate per-rank lists (e.g. validation references and hypotheses) across ranks; identity on one process."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return values
    gathered: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, values)
    return {k: sum((g[k] for g in gathered), []) for k in values}


class TokenThroughput(L.Callback):
    """Logs training throughput every step, summed over ranks: ``perf/tokens_per_s`` (from ``batch["n_tokens"]``),
    ``perf/audio_s_per_s`` (from ``batch["audio_lengths"]`` at the module's ``sample_rate``, 16 kHz by default),
    ``perf/samples_per_s``, and on CUDA the model FLOPs utilisation ``perf/mfu`` from the module's
    ``flops_per_token`` and the device's peak bf16/fp32 FLOPs."""

    def __init__(self) -> None:
        self._t: float | None = None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._t is None or not isinstance(batch, dict):
            return
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - self._t
        ranks = trainer.world_size
        rows = next((len(v) for k in ("input", "audio", "text") if (v := batch.get(k)) is not None), None)
        if rows:
            pl_module.log("perf/samples_per_s", rows * ranks / dt, on_step=True, on_epoch=False)
        if "audio_lengths" in batch:
            seconds = float(batch["audio_lengths"].sum()) / getattr(pl_module, "sample_rate", SAMPLE_RATE)
            pl_module.log("perf/audio_s_per_s", seconds * ranks / dt, on_step=True, on_epoch=False)
        if "n_tokens" not in batch:
            return
        tokens = float(batch["n_tokens"]) * ranks
        pl_module.log("perf/tokens_per_s", tokens / dt, on_step=True, on_epoch=False)
        flops = getattr(pl_module, "flops_per_token", None)
        if flops and trainer.strategy.root_device.type == "cuda":
            from lightning.fabric.utilities.throughput import get_available_flops

            peak = get_available_flops(trainer.strategy.root_device, "bf16-true" if "bf16" in str(trainer.precision) else "32-true")
            if peak:
                pl_module.log("perf/mfu", flops * tokens / dt / (peak * ranks), on_step=True, on_epoch=False)


def check_same_vocabulary(model_tokenizer: Any, data_tokenizer: Any, model_names: str, data_names: str) -> None:
    """The data of an LM stage must be written in the model's vocabulary: one error naming the options of both
    (``model_names`` / ``data_names``, e.g. "model.tokenizer='/models/glm-4-9b'") otherwise."""
    vocab = model_tokenizer.backend.get_vocab(with_added_tokens=True)
    if data_tokenizer.backend.get_vocab(with_added_tokens=True) != vocab:
        raise ValueError(f"the data's vocabulary ({data_names}) differs from the model's ({model_names}); name the "
                         f"same stage-1 export and tokenizer in both")


class Stage(L.LightningModule):
    """What every stage's LightningModule shares: the gradient norm logged before each optimiser step, AdamW with
    warm-up and decay from the hyper-parameters ``lr``, ``weight_decay``, ``warmup_steps``, ``min_lr_ratio`` and
    ``decay``, the RNG state saved in checkpoints, and the model built (``configure_model``) before a checkpoint's
    weights are loaded."""

    adam_betas: tuple[float, float] = (0.9, 0.95)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        norm = grad_norm(self)
        if norm is not None:
            self.log("train/grad_norm", norm)

    def configure_optimizers(self) -> dict[str, Any]:
        h = self.hparams
        return adamw_with_schedule(self.named_parameters(), lr=h.lr, weight_decay=h.weight_decay, betas=self.adam_betas,
                                   warmup_steps=h.warmup_steps, total_steps=int(self.trainer.estimated_stepping_batches),
                                   min_lr_ratio=h.min_lr_ratio, decay=h.get("decay", "cosine"))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["rng"] = rng_state()
        if self.hparams.get("lora"):
            checkpoint["lora_base"] = self.hparams.get("init_from")
            if self.device_mesh is None:
                # LoRA: only what trains (adapters, and e.g. KE-Omni's speech adapter) and the buffers; the frozen
                # base is rebuilt from model.init_from, which the checkpoint names. A sharded checkpoint keeps every
                # weight (each rank its shard): Lightning's distributed-checkpoint load reads all of the model's keys.
                frozen = {n for n, p in self.named_parameters() if not p.requires_grad}
                checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k not in frozen}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.configure_model()
        if "rng" in checkpoint:
            set_rng_state(checkpoint["rng"])
        if self.hparams.get("lora"):
            trained = [n for n, p in self.named_parameters() if p.requires_grad]
            # (a sharded checkpoint has loaded its weights into the model already and holds no "state_dict")
            missing = [n for n in trained if n not in checkpoint.get("state_dict", trained)]
            if missing:
                raise ValueError(f"this checkpoint lacks {len(missing)} trained LoRA weight(s), e.g. {missing[0]!r}: it "
                                 f"was not written by a run with this model.lora")
            if checkpoint.get("lora_base") != self.hparams.get("init_from"):
                raise ValueError(f"this LoRA checkpoint adapts model.init_from={checkpoint.get('lora_base')!r}, but "
                                 f"model.init_from is {self.hparams.get('init_from')!r}")

    def apply_lora(self, llm: nn.Module) -> None:
        """``model.lora``: adapters on ``llm``'s linear layers, the rest of ``llm`` frozen; checkpoints then keep the
        trained weights only. Logs the trainable / total parameter counts."""
        from lightning.pytorch.utilities import rank_zero_info

        from lit_keomni.nn.lora import LoRAConfig, apply_lora, parameter_counts

        if not self.hparams.get("lora"):
            return
        apply_lora(llm, LoRAConfig.from_dict(self.hparams.lora))
        self.strict_loading = False  # the frozen base comes from init_from, not from the checkpoint
        trainable, total = parameter_counts(llm)
        rank_zero_info(f"LoRA: {trainable:,} trainable of {total:,} LM parameters ({100 * trainable / total:.2f} %)")

    def on_train_start(self) -> None:
        if self.hparams.get("lora") and self.logger is not None:
            from lit_keomni.nn.lora import parameter_counts

            trainable, total = parameter_counts(self)
            self.logger.log_metrics({"params/trainable": trainable, "params/total": total}, step=0)

    def export_weights(self, state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, Any],
                                                                     dict[str, Any]]:
        """(weights, extra files, extra config fields) of an export: without LoRA the weights as they are; with it,
        merged into their layers (``merge_lora``), or the base and ``lora.safetensors`` beside it, which
        ``load_export`` merges, so every later stage reads either."""
        from lit_keomni.nn.lora import LORA_FILE, LoRAConfig, base_state_dict, lora_state_dict, merge_lora_state

        if not self.hparams.get("lora"):
            return state, {}, {}
        config = LoRAConfig.from_dict(self.hparams.lora)
        if self.hparams.get("merge_lora", True):
            return merge_lora_state(state, config), {}, {"lora_merged": config.to_dict()}
        from safetensors.torch import save_file

        adapters = {k: v.contiguous() for k, v in lora_state_dict(state).items()}
        files = {"lora": lambda folder: save_file(adapters, str(folder / LORA_FILE), metadata={"format": "pt"})}
        return base_state_dict(state), files, {"lora": config.to_dict()}

    def log_loss(self, split: str, loss: torch.Tensor, acc: torch.Tensor, batch_size: int, acc_name: str = "acc") -> None:
        """``{split}/loss`` (progress bar) and ``{split}/{acc_name}``; validation values are averaged over ranks."""
        sync = split != "train"
        self.log(f"{split}/loss", loss, prog_bar=True, batch_size=batch_size, sync_dist=sync)
        self.log(f"{split}/{acc_name}", acc, batch_size=batch_size, sync_dist=sync)

    def log_text(self, tag: str, text: str) -> None:
        """A text sample in TensorBoard (rank 0, loggers that take text)."""
        exp = getattr(self.logger, "experiment", None)
        if self.global_rank == 0 and exp is not None and hasattr(exp, "add_text"):
            exp.add_text(tag, text, self.global_step)


def add_mel_l1(sums: list[float], mel_fake: Tensor, mel_real: Tensor, frames: Tensor) -> None:
    """Add a validation batch's masked log-mel L1 to ``sums`` = (L1 total, valid frames x bins): frames past each
    utterance's ``frames`` are padding."""
    valid = (torch.arange(mel_real.shape[-1], device=mel_real.device)[None, :] < frames[:, None])[:, None, :]
    sums[0] += float(((mel_fake - mel_real).abs() * valid).sum())
    sums[1] += float(valid.sum() * mel_real.shape[1])


def log_val_mel_l1(module: L.LightningModule, sums: list[float]) -> float:
    """Log ``val/mel_l1`` of a vocoder stage: ``sums`` = (L1 total, valid frames x bins) of this rank's validation,
    summed over ranks; the sanity check's value is kept as ``module.init_mel_l1`` and logged as ``val/mel_l1_start``
    (Lightning drops the sanity check's ``self.log``)."""
    total = torch.tensor(sums, dtype=torch.float64)
    if module.trainer.world_size > 1:
        total = module.all_gather(total).sum(0)
    value = float(total[0] / max(float(total[1]), 1.0))  # mean over every valid frame and mel bin of the val set
    module.log("val/mel_l1", value, prog_bar=True)
    sanity = module.trainer.sanity_checking
    if sanity:
        module.init_mel_l1 = value
        if module.logger is not None and module.global_rank == 0:
            module.logger.log_metrics({"val/mel_l1_start": value}, step=module.global_step)
    module.print(f"val/mel_l1 at step {module.global_step}{' (start)' if sanity else ''}: {value:.4f}")
    return value


def log_audio_samples(module: L.LightningModule, ids: list[str], wav: Tensor, fake: Tensor, mel_real: Tensor,
                      mel_fake: Tensor, lengths: Tensor, frames: Tensor, sample_rate: int, count: int) -> None:
    """Generated and real audio of the first ``count`` utterances and their mel images in TensorBoard (rank 0;
    loggers with add_audio/add_image)."""
    from lit_keomni.nn.audio import mel_spectrogram_image

    exp = getattr(module.logger, "experiment", None)
    if module.global_rank != 0 or not (hasattr(exp, "add_audio") and hasattr(exp, "add_image")):
        return
    step = module.global_step
    for i in range(min(count, wav.shape[0])):
        n, f = int(lengths[i]), int(frames[i])
        exp.add_audio(f"val/{ids[i]}/generated", fake[i, :n].float().clamp(-1, 1)[None].cpu(), step, sample_rate)
        exp.add_audio(f"val/{ids[i]}/real", wav[i, :n].float()[None].cpu(), step, sample_rate)
        exp.add_image(f"val/{ids[i]}/mel_generated", mel_spectrogram_image(mel_fake[i, :, :f]), step, dataformats="CHW")
        exp.add_image(f"val/{ids[i]}/mel_real", mel_spectrogram_image(mel_real[i, :, :f]), step, dataformats="CHW")
