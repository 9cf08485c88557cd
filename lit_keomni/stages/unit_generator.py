"""Stage 6 — speech unit generator of KE-Omni's speech decoder (seed 000 §4.3, §5.1).

    python -m lit_keomni fit --config recipes/stage6.yaml

The frozen stage-4 LLM's last hidden states of an answer's text tokens are upsampled by the tokens' durations
(``nn.speech_decoder.length_regulate``: ground-truth durations in training), given each frame's index inside its
token, and a bidirectional transformer maps them to discrete speech units non-autoregressively
(``nn.speech_decoder.UnitGenerator``). Loss: cross-entropy against the answer's units (the stage-1 speech tokens or
HuBERT k-means units). Trained per agent speaker (``data.speaker``) with the LLM and the duration predictor frozen:
"the LLM is frozen, and the dialogues were separated by agent speaker and used to train speech decoders for each
agent speaker individually". Logged: unit accuracy and the most-frequent-unit baseline accuracy; with
``duration_from`` (the stage-5 export), validation also decodes with predicted durations
(``val/unit_acc_predicted_durations``, ``val/length_error_predicted``). Paper: batch 256, 5 epochs, peak lr 1e-4.
Output: ``checkpoints/stage6/export`` (kind ``unit_generator``), loaded by ``checkpoints.load_unit_generator``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lit_keomni.checkpoints import CONFIG_FILE, decoder_handoff, load_duration, write_export
from lit_keomni.configs import TransformerConfig, config_dict
from lit_keomni.distributed import full_state_dict, shard_or_compile
from lit_keomni.nn.speech_decoder import UnitGenerator, decode_units
from lit_keomni.training import Stage

EXPORT_KIND = "unit_generator"


class UnitGeneratorStage(Stage):
    """Unit generator over upsampled hidden states of the frozen LLM; exports kind ``unit_generator``."""

    def __init__(
        self,
        config: str = "tiny",
        overrides: dict[str, Any] | None = None,
        llm_from: str = "checkpoints/stage4_keomni/export",
        units_from: str = "checkpoints/stage1/export",
        duration_from: str | None = None,
        lr: float = 1e-4,
        min_lr_ratio: float = 0.1,
        weight_decay: float = 0.01,
        warmup_steps: int = 100,
        decay: str = "cosine",
        export_dir: str | None = "checkpoints/stage6/export",
        activation_checkpointing: bool = False,
        compile: bool = False,
    ) -> None:
        """
        Args:
            config: ``TransformerConfig`` preset of the generator's transformer (made bidirectional).
            overrides: Field overrides of the preset, e.g. ``{n_layer: 4, n_embd: 256}``.
            llm_from: The frozen stage-4 KE-Omni export whose hidden states are the input.
            units_from: Unit source (stage-1 export or ``units`` export): the units to generate.
            duration_from: Stage-5 export (kind duration), frozen: validation also decodes with its predicted
                durations. It must have been trained on the same LLM and units (checked).
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
        self.model: UnitGenerator | None = None
        self.handoff: dict[str, Any] = {}
        self.speaker: str | None = None
        self.top_unit: int | None = None
        # the frozen stage-5 predictor and its meta, kept out of the state dict and the optimiser
        self._durations: list[Any] = []

    # ------------------------------------------------------------------ model
    def configure_model(self) -> None:
        if self.model is not None:
            return
        h = self.hparams
        self.handoff = decoder_handoff(h.llm_from, h.units_from)
        self.model = UnitGenerator(self.handoff["hidden_size"], self.handoff["num_units"], self.model_config)
        self.model_config = self.model.config
        if h.duration_from:
            expect = {k: self.handoff[k] for k in ("hidden_size", "llm_fingerprint", "num_units", "units_fingerprint")}
            predictor, meta = load_duration(h.duration_from, expect)
            self._durations = [predictor.requires_grad_(False), meta]
        shard_or_compile(self, self.model, self.model.net.blocks)  # FSDP2 per block under ModelParallelStrategy

    def forward(self, hidden: Tensor, durations: Tensor, mask: Tensor) -> Tensor:
        return self.model(hidden, durations, mask)

    def _from_data(self) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        if dm is None or not hasattr(dm, "baselines"):
            return
        dm.check_handoff(self.handoff)
        self.speaker = dm.speaker
        self.top_unit = int(dm.baselines()["top_unit"])
        if self._durations:
            trained_for = self._durations[1].get("speaker")
            if trained_for is not None and trained_for != self.speaker:
                raise ValueError(f"{Path(self.hparams.duration_from) / CONFIG_FILE}: field 'speaker' is "
                                 f"{trained_for!r}, but data.speaker is {self.speaker!r}")

    def on_fit_start(self) -> None:
        self._from_data()

    def on_validation_start(self) -> None:
        if self.top_unit is None:
            self._from_data()

    # ------------------------------------------------------------------ steps
    def _step(self, split: str, batch: dict[str, Any]) -> Tensor:
        mask, codes, frame_mask = batch["mask"], batch["codes"], batch["frame_mask"]
        logits = self(batch["hidden"], batch["durations"], mask)
        if logits.shape[1] != codes.shape[1]:
            raise ValueError(f"batch {batch['id'][:4]}: durations give {logits.shape[1]} frames, units "
                             f"{codes.shape[1]}; rebuild the features (data.decoder_dir)")
        target = codes.masked_fill(~frame_mask, -100)
        loss = F.cross_entropy(logits.float().flatten(0, 1), target.flatten(), ignore_index=-100)
        n = frame_mask.sum().clamp(min=1)
        acc = ((logits.argmax(-1) == codes) & frame_mask).sum() / n
        B, sync = mask.shape[0], split != "train"
        self.log(f"{split}/loss", loss, prog_bar=True, batch_size=B, sync_dist=sync)
        self.log(f"{split}/unit_acc", acc, batch_size=B, sync_dist=sync)
        if split != "train" and self.top_unit is not None:
            self.log("val/baseline_unit_acc", ((codes == self.top_unit) & frame_mask).sum() / n, batch_size=B,
                     sync_dist=True)
        return loss

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        return self._step("train", batch)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._step("val", batch)
        if self._durations:
            self._validate_predicted_durations(batch)

    @torch.no_grad()
    def _validate_predicted_durations(self, batch: dict[str, Any]) -> None:
        """Units decoded with the stage-5 predictor's durations, compared frame by frame with the targets (frames
        past the shorter of the two count as wrong)."""
        predictor = self._durations[0].to(self.device)
        units = decode_units(predictor, self.model, batch["hidden"], batch["mask"])
        right, total, length_error = 0, 0, 0.0
        for u, c, n in zip(units, batch["codes"], batch["frame_mask"].sum(-1).tolist()):
            m = min(len(u), n)
            right += int((u[:m] == c[:m]).sum())
            total += max(len(u), n)
            length_error += abs(len(u) - n) / max(1, n)
        B = len(units)
        self.log("val/unit_acc_predicted_durations", right / max(1, total), batch_size=B, sync_dist=True)
        self.log("val/length_error_predicted", length_error / B, batch_size=B, sync_dist=True)

    # ------------------------------------------------------------------ state
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["decoder_data"] = {"speaker": self.speaker, "top_unit": self.top_unit}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        data = checkpoint.get("decoder_data", {})
        self.speaker, self.top_unit = data.get("speaker"), data.get("top_unit")

    # ------------------------------------------------------------------ handoff
    def export(self, out_dir: str | Path) -> Path:
        """Write the handoff folder. Sharded, every rank calls this (the weights are gathered) and rank 0 writes."""
        state = full_state_dict(self.model)
        if self.global_rank != 0:
            return Path(out_dir)
        return write_export(out_dir, kind=EXPORT_KIND, config=config_dict(self.model_config), state_dict=state,
                            extra={**self.handoff, "speaker": self.speaker,
                                   "duration_from": str(Path(self.hparams.duration_from).resolve())
                                   if self.hparams.duration_from else None})
