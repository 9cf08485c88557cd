"""Stage 5 — duration predictor of KE-Omni's speech decoder (seed 000 §4.3, §5.1).

    python -m lit_keomni fit --config recipes/stage5.yaml

A bidirectional transformer (``nn.speech_decoder.DurationPredictor``) reads the frozen stage-4 LLM's last hidden
states of an answer's text tokens ("the duration predictor takes the hidden states of the last transformer layer in
the LLM, instead of tokens, as the input") and predicts each token's duration in unit frames. Targets: word
timestamps spread evenly over characters and merged per token (``lit_keomni.durations``). Loss: MSE on durations in
frames (linear domain). Logged: MAE in frames, the per-utterance total-length error, and the same two for the
trivial baseline that predicts the training mean duration for every token (``val/baseline_*``): the predictor must
beat it. Paper: batch 256, 5 epochs, AdamW, peak lr 1e-4.
Inputs: ``checkpoints/stage4_keomni/export`` (through the features of ``datamodules.duration``), the unit source.
Output: ``checkpoints/stage5/export`` (kind ``duration``), loaded by ``checkpoints.load_duration``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lit_keomni.checkpoints import decoder_handoff, write_export
from lit_keomni.configs import TransformerConfig, config_dict
from lit_keomni.distributed import full_state_dict, shard_or_compile
from lit_keomni.nn.speech_decoder import DurationPredictor, cumulative_round
from lit_keomni.training import Stage

EXPORT_KIND = "duration"


class DurationStage(Stage):
    """Duration predictor over the frozen LLM's hidden states; exports kind ``duration``."""

    def __init__(
        self,
        config: str = "tiny",
        overrides: dict[str, Any] | None = None,
        llm_from: str = "checkpoints/stage4_keomni/export",
        units_from: str = "checkpoints/stage1/export",
        lr: float = 1e-4,
        min_lr_ratio: float = 0.1,
        weight_decay: float = 0.01,
        warmup_steps: int = 100,
        decay: str = "cosine",
        export_dir: str | None = "checkpoints/stage5/export",
        activation_checkpointing: bool = False,
        compile: bool = False,
    ) -> None:
        """
        Args:
            config: ``TransformerConfig`` preset of the predictor's transformer (made bidirectional).
            overrides: Field overrides of the preset, e.g. ``{n_layer: 2, n_embd: 128}``.
            llm_from: The frozen stage-4 KE-Omni export whose hidden states are the input (size and fingerprint are
                recorded; the data must come from it).
            units_from: Unit source (stage-1 export or ``units`` export): the frames the durations count.
            lr: Peak learning rate (paper: 1e-4).
            min_lr_ratio: Final learning rate as a fraction of ``lr``.
            weight_decay: AdamW weight decay (not given in the paper).
            warmup_steps: Linear warm-up steps.
            decay: "cosine" or "linear" decay after warm-up.
            export_dir: Where the ``Export`` callback writes the handoff folder at the end of fit.
            activation_checkpointing: Recompute each block in backward (FSDP runs only).
            compile: ``torch.compile`` each block (``distributed.apply_compile``; with FSDP before sharding).
        """
        super().__init__()
        self.save_hyperparameters()
        self.model_config = TransformerConfig.from_name(config, **(overrides or {}))
        self.model: DurationPredictor | None = None
        self.handoff: dict[str, Any] = {}
        self.speaker: str | None = None
        self.mean_duration: float | None = None

    # ------------------------------------------------------------------ model
    def configure_model(self) -> None:
        if self.model is not None:
            return
        self.handoff = decoder_handoff(self.hparams.llm_from, self.hparams.units_from)
        self.model = DurationPredictor(self.handoff["hidden_size"], self.model_config)
        self.model_config = self.model.config
        shard_or_compile(self, self.model, self.model.net.blocks)  # FSDP2 per block under ModelParallelStrategy

    def forward(self, hidden: Tensor, mask: Tensor) -> Tensor:
        return self.model.raw(hidden, mask)

    def _from_data(self) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        if dm is None or not hasattr(dm, "baselines"):
            return
        dm.check_handoff(self.handoff)
        self.speaker = dm.speaker
        self.mean_duration = float(dm.baselines()["mean_duration"])

    def on_fit_start(self) -> None:
        self._from_data()

    def on_validation_start(self) -> None:
        if self.mean_duration is None:
            self._from_data()

    # ------------------------------------------------------------------ steps
    def _step(self, split: str, batch: dict[str, Any]) -> Tensor:
        mask, target = batch["mask"], batch["durations"].float()
        raw = self(batch["hidden"], mask)
        n = mask.sum().clamp(min=1)
        loss = ((raw - target) ** 2 * mask).sum() / n
        B, sync = mask.shape[0], split != "train"
        pred = raw.detach().float().clamp(min=0) * mask
        self.log(f"{split}/loss", loss, prog_bar=True, batch_size=B, sync_dist=sync)
        self.log(f"{split}/mae_frames", ((pred - target).abs() * mask).sum() / n, batch_size=B, sync_dist=sync)
        if split == "train":
            return loss
        totals = target.sum(-1)
        length_error = (cumulative_round(pred).sum(-1) - totals).abs().float()
        self.log("val/total_error_frames", length_error.mean(), batch_size=B, sync_dist=True)
        self.log("val/total_error_rel", (length_error / totals.clamp(min=1)).mean(), batch_size=B, sync_dist=True)
        if self.mean_duration is not None:
            base = torch.full_like(target, self.mean_duration) * mask
            base_len = (torch.round(base.sum(-1)) - totals).abs()
            self.log("val/baseline_mae_frames", ((base - target).abs() * mask).sum() / n, batch_size=B, sync_dist=True)
            self.log("val/baseline_total_error_frames", base_len.mean(), batch_size=B, sync_dist=True)
        return loss

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        return self._step("train", batch)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._step("val", batch)

    # ------------------------------------------------------------------ state
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["decoder_data"] = {"speaker": self.speaker, "mean_duration": self.mean_duration}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        data = checkpoint.get("decoder_data", {})
        self.speaker, self.mean_duration = data.get("speaker"), data.get("mean_duration")

    # ------------------------------------------------------------------ handoff
    def export(self, out_dir: str | Path) -> Path:
        """Write the handoff folder. Sharded, every rank calls this (the weights are gathered) and rank 0 writes."""
        state = full_state_dict(self.model)
        if self.global_rank != 0:
            return Path(out_dir)
        return write_export(out_dir, kind=EXPORT_KIND, config=config_dict(self.model_config), state_dict=state,
                            extra={**self.handoff, "speaker": self.speaker, "train_mean_duration": self.mean_duration})
