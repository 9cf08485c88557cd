"""Stage 3 — speech-text pre-training (GLM-4-Voice §2.3, §2.3.1, §3.1 "Configuration", Appendix A).

    python -m lit_keomni fit --config recipes/stage3.yaml

A text LM (a local Hugging Face Llama-layout folder, an earlier LM export, or random for the CPU recipe) whose
vocabulary is extended with the stage-1 speech tokens learns next-token prediction on a mixture of five sources
(``datamodules/pretrain.py``): text (30 % of every batch), synthetic interleaved speech-text data, unsupervised
speech, and ASR / TTS pairs. Text, speech and interleaved documents are trained on every token; ASR only on the
transcript, TTS only on the speech. Rows are packed documents: attention stays within a document and positions
restart at each one. AdamW β = (0.9, 0.95); the paper decays the learning rate linearly from 6e-5 to 6e-6 at sequence
length 8192 over 1T tokens. Logged: loss overall and per source (train and val), accuracy, grad norm, and the share of
tokens and epochs of each source actually consumed (``mix/…``, kept across resume).
Inputs: ``checkpoints/stage1/export`` (vocabulary), the packed data. Output: ``checkpoints/stage3/export`` (kind
``speech_lm``, read by ``checkpoints.load_lm``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lit_keomni.checkpoints import lm_tokenizer, write_export
from lit_keomni.configs import TransformerConfig, config_dict
from lit_keomni.distributed import full_state_dict, shard_or_compile
from lit_keomni.lm import build_lm, flops_per_token, masked_lm_loss
from lit_keomni.nn.transformer import Transformer
from lit_keomni.release import check_lm_vocabulary, lm_source
from lit_keomni.training import Stage, check_same_vocabulary

EXPORT_KIND = "speech_lm"


class Pretrain(Stage):
    """The speech LM pre-trained on the stage-3 mixture; exports the ``speech_lm`` folder read by stage 4."""

    def __init__(
        self,
        config: str = "tiny",
        overrides: dict[str, Any] | None = None,
        speech_export: str = "checkpoints/stage1/export",
        init_from: str | None = None,
        tokenizer: str | None = None,
        lr: float = 6e-5,
        min_lr_ratio: float = 0.1,
        weight_decay: float = 0.1,
        warmup_steps: int = 0,
        decay: str = "linear",
        export_dir: str | None = "checkpoints/stage3/export",
        activation_checkpointing: bool = False,
        compile: bool = False,
        loss_chunk: int = 0,
        lora: dict[str, Any] | None = None,
        merge_lora: bool = True,
    ) -> None:
        """
        Args:
            config: ``TransformerConfig`` preset ("tiny", "glm-4-voice-9b", ...); its vocab_size is replaced by the
                speech-extended tokenizer's.
            overrides: Field overrides of the preset, e.g. ``{n_layer: 4, n_embd: 256, block_size: 512}``.
            speech_export: Stage-1 export whose tokenizer, extended with its speech tokens, is the vocabulary.
            init_from: Local released text LM folder (Llama, Qwen2, GLM / GLM-4 or ChatGLM layout; the paper starts
                from GLM-4-9B-Base) whose embeddings grow to the speech vocabulary (set ``tokenizer`` to the same
                folder), or an LM export of ours; None = random.
            tokenizer: The LM's own vocabulary: a folder with ``tokenizer.json`` or GLM-4's ``tokenizer.model``;
                None = the stage-1 export's text tokenizer. The data module must name the same.
            lr: Peak learning rate (paper: 6e-5).
            min_lr_ratio: Final learning rate as a fraction of ``lr`` (paper: 6e-6 / 6e-5 = 0.1).
            weight_decay: AdamW weight decay (not given in the paper).
            warmup_steps: Linear warm-up steps (none in the paper's description).
            decay: "linear" (paper) or "cosine" decay after warm-up.
            export_dir: Where the ``Export`` callback writes the handoff folder at the end of fit.
            activation_checkpointing: Recompute each block in backward instead of storing its activations
                (FSDP runs only).
            compile: ``torch.compile`` each block (``distributed.apply_compile``; with FSDP after checkpoint
                wrapping, before sharding); the first step of each new batch shape is slower.
            loss_chunk: Tokens per chunk of the output layer + cross-entropy (``nn.losses``): the full
                (tokens, vocabulary) logits are never stored; 0 = full logits. Same loss and gradients.
            lora: LoRA on the LM's linear layers (``nn.lora.LoRAConfig``: rank, alpha, dropout, targets,
                base_dtype), the rest of the LM frozen; checkpoints keep the trained weights only. None = full training.
            merge_lora: Export with the adapters merged into the weights (True), or the base plus
                ``lora.safetensors`` (False); later stages read either.
        """
        super().__init__()
        self.save_hyperparameters()
        self.model_config = TransformerConfig.from_name(config, **(overrides or {}))
        self.model: Transformer | None = None
        self.text_tokenizer = None
        self.speech_meta: dict[str, Any] = {}
        self.source_names: tuple[str, ...] = ()
        self.seen_tokens = torch.zeros(0, dtype=torch.long)  # per source, cumulative over the whole run
        self.seen_rows = torch.zeros(0, dtype=torch.long)
        self._val: dict[int, Tensor] = {}

    # ------------------------------------------------------------------ model
    def configure_model(self) -> None:
        if self.model is not None:
            return
        self.text_tokenizer, self.speech_meta = lm_tokenizer(self.hparams.speech_export, self.hparams.tokenizer)
        check_lm_vocabulary(self.hparams.init_from, self.text_tokenizer,
                            f"model.speech_export={self.hparams.speech_export!r}, model.tokenizer={self.hparams.tokenizer!r}")
        self.weights_source = lm_source(self.hparams.init_from)  # the released layout an export goes back to
        self.model = build_lm(self.model_config, self.text_tokenizer.vocab_size, self.hparams.init_from)
        self.model_config = self.model.config
        self.flops_per_token = flops_per_token(self.model, self.model_config.block_size)  # for MFU
        self.apply_lora(self.model)
        shard_or_compile(self, self.model, self.model.blocks)  # FSDP2 per block under ModelParallelStrategy

    def forward(self, idx: Tensor, document_ids: Tensor | None = None, target: Tensor | None = None) -> Any:
        """Logits of packed rows; with ``target``, the per-token losses and predictions (``Transformer.forward``)."""
        return self.model(idx, document_ids=document_ids, targets=target, loss_chunk=self.hparams.loss_chunk)

    # ------------------------------------------------------------------ mixture bookkeeping
    def _datamodule(self) -> Any:
        return getattr(self.trainer, "datamodule", None) if self._trainer is not None else None

    def _names(self) -> tuple[str, ...]:
        """Source names by row ``source`` index, from the data module (``sources``) when it has them."""
        if not self.source_names:
            self.source_names = tuple(getattr(self._datamodule(), "sources", ()) or ())
        return self.source_names

    def _name(self, index: int) -> str:
        names = self._names()
        return names[index] if index < len(names) else f"source{index}"

    def _grow(self, n: int) -> None:
        if self.seen_tokens.numel() < n:
            pad = n - self.seen_tokens.numel()
            self.seen_tokens = torch.cat([self.seen_tokens, torch.zeros(pad, dtype=torch.long)])
            self.seen_rows = torch.cat([self.seen_rows, torch.zeros(pad, dtype=torch.long)])

    def on_fit_start(self) -> None:
        dm = self._datamodule()
        if dm is not None and hasattr(dm, "tokenizer_file"):
            check_same_vocabulary(self.text_tokenizer, dm.tokenizer,
                                  f"model.speech_export={self.hparams.speech_export!r}, model.tokenizer={self.hparams.tokenizer!r}",
                                  f"data.speech_export={dm.speech_export!r}, data.tokenizer={dm.tokenizer_file!r}")
        weights = getattr(dm, "weights", None)
        if not weights:
            return
        exp = getattr(self.logger, "experiment", None)
        if self.global_rank == 0 and exp is not None and hasattr(exp, "add_text"):
            table = "| source | configured share of rows | rows available (train) |\n|---|---|---|\n"
            available = dm.rows_available("train") if hasattr(dm, "rows_available") else {}
            table += "\n".join(f"| {s} | {w:.3f} | {available.get(s, '–')} |" for s, w in weights.items())
            exp.add_text("mix/configured", table, self.global_step)

    def _agreed(self, n: int) -> int:
        """The largest ``n`` of all ranks: tables reduced over ranks need one size on every rank (without a data
        module naming the sources, each rank only knows the sources of its own rows)."""
        if self.trainer.world_size > 1:
            n = int(self.trainer.strategy.reduce(torch.tensor(float(n), device=self.device), reduce_op="max"))
        return n

    def _count(self, batch: dict[str, Any]) -> None:
        """Add this step's rows and real tokens per source (summed over ranks) to the run's totals and log shares."""
        source = batch["source"]
        n = self._agreed(max(int(source.max()) + 1, len(self._names())))
        tokens = torch.zeros(n, dtype=torch.long, device=source.device)
        tokens.index_add_(0, source, (batch["document_ids"] >= 0).sum(1))
        rows = torch.bincount(source, minlength=n)
        both = self.trainer.strategy.reduce(torch.stack([tokens, rows]).float(), reduce_op="sum").long().cpu()
        self._grow(n)
        self.seen_tokens[:n] += both[0]
        self.seen_rows[:n] += both[1]
        total = max(int(self.seen_tokens.sum()), 1)
        dm = self._datamodule()
        available = dm.rows_available("train") if hasattr(dm, "rows_available") else {}
        for i in range(self.seen_tokens.numel()):
            name = self._name(i)
            if name in getattr(dm, "active", (name,)):
                self.log(f"mix/{name}_share", float(self.seen_tokens[i]) / total, on_step=True, on_epoch=False)
                if available.get(name):
                    self.log(f"mix/{name}_epochs", float(self.seen_rows[i]) / available[name], on_step=True,
                             on_epoch=False)

    # ------------------------------------------------------------------ steps
    def _losses(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(mean loss over trained tokens, per-token losses, trained mask, top-1 accuracy) of a packed batch."""
        target = batch["target"]
        per_token, predicted = self(batch["input"], batch["document_ids"], target)
        loss, acc = masked_lm_loss(per_token, predicted, target)
        return loss, per_token, target != -100, acc

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        loss, per_token, trained, acc = self._losses(batch)
        bs = batch["input"].shape[0]
        self.log_loss("train", loss, acc, bs)
        with torch.no_grad():
            row_loss, row_count = per_token.detach().sum(1), trained.sum(1)
            for i in batch["source"].unique().tolist():
                sel = batch["source"] == i
                count = row_count[sel].sum()
                if count > 0:
                    self.log(f"train/loss_{self._name(i)}", row_loss[sel].sum() / count, batch_size=int(sel.sum()))
        self._count(batch)
        return loss

    def on_validation_epoch_start(self) -> None:
        self._val = {}

    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        _, per_token, trained, acc = self._losses(batch)
        sums = torch.stack([per_token.sum().double(), trained.sum().double(),
                            (acc * trained.sum()).double()])
        source = int(batch["source"][0])
        self._val[source] = self._val.get(source, torch.zeros_like(sums)) + sums

    def on_validation_epoch_end(self) -> None:
        if not self._val and self.trainer.world_size == 1:
            return
        n = self._agreed(max(len(self._names()), max(self._val, default=-1) + 1))
        table = torch.zeros(n, 3, dtype=torch.float64, device=self.device)
        for s, v in self._val.items():
            table[s] = v.to(self.device)
        table = self.trainer.strategy.reduce(table, reduce_op="sum")
        for s in range(n):
            if table[s, 1] > 0:
                self.log(f"val/loss_{self._name(s)}", float(table[s, 0] / table[s, 1]))
                self.log(f"val/acc_{self._name(s)}", float(table[s, 2] / table[s, 1]))
        total = table.sum(0)
        if total[1] > 0:
            self.log("val/loss", float(total[0] / total[1]), prog_bar=True)
            self.log("val/acc", float(total[2] / total[1]))

    # ------------------------------------------------------------------ optimisation & state
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["mix_seen"] = {"tokens": self.seen_tokens.clone(), "rows": self.seen_rows.clone()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        if "mix_seen" in checkpoint:
            self.seen_tokens = checkpoint["mix_seen"]["tokens"].clone().long()
            self.seen_rows = checkpoint["mix_seen"]["rows"].clone().long()

    # ------------------------------------------------------------------ handoff
    def export(self, out_dir: str | Path) -> Path:
        """Write the handoff folder. Sharded, every rank calls this (the weights are gathered) and rank 0 writes."""
        state = full_state_dict(self.model)
        if self.global_rank != 0:
            return Path(out_dir)
        m = self.speech_meta
        state, lora_files, lora_meta = self.export_weights(state)
        return write_export(
            out_dir,
            kind=EXPORT_KIND,
            config=config_dict(self.model_config),
            state_dict=state,
            extra={"stage": "pretrain",
                   "speech_tokenizer": {"frame_rate_hz": m["frame_rate_hz"], "codebook_size": m["codebook_size"],
                                        "export": str(Path(self.hparams.speech_export).resolve())},
                   "weights_source": self.weights_source, **lora_meta},
            files={"tokenizer": self.text_tokenizer.save, **lora_files},
        )
