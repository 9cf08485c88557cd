"""Stage 1 — supervised speech tokenizer (GLM-4-Voice §2.1, Appendix B.1; Tables 1, 10, 11).

    python -m lit_keomni fit --config recipes/stage1.yaml

A Whisper-style encoder with a causal conv stem and block-causal attention, an average-pooling layer and a vector
quantiser after ``vq_position`` layers, trained on ASR through a Whisper decoder (plus a CTC head on the same
quantised states). Inputs: 16 kHz utterances and transcripts. Output: ``checkpoints/stage1/export`` — the encoder
up to the VQ is the speech tokenizer (``python -m lit_keomni tokenize``), 12.5 Hz codes by default.
Losses: decoder cross-entropy + ``ctc_weight`` · CTC + the VQ commitment loss (EMA codebook, decay 0.99, dead-code
restart, straight-through gradients).

The paper fine-tunes a *trained* ASR model with the bottleneck inserted. From scratch we do the same in one run: the
first ``vq_start`` fraction of steps trains plain ASR, then the codebook is initialised by k-means on the pooled
features of the last batches and the bottleneck is switched on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor

from lit_keomni.audio import SAMPLE_RATE
from lit_keomni.checkpoints import (
    check_hf_whisper_config,
    load_state_checked,
    read_hf_folder,
    whisper_from_hf,
    write_export,
)
from lit_keomni.configs import SpeechTokenizerConfig, config_dict
from lit_keomni.distributed import full_state_dict, shard_or_compile
from lit_keomni.eval.asr import error_rate
from lit_keomni.nn.audio import LogMel, mel_spectrogram_image
from lit_keomni.nn.whisper import SpeechTokenizerModel
from lit_keomni.text.tokenizer import TextTokenizer
from lit_keomni.training import adamw_with_schedule, gather_lists, grad_norm, rng_state, set_rng_state

EXPORT_KIND = "speech_tokenizer"


def spec_augment(mel: Tensor, lengths: Tensor, gen: torch.Generator, freq_masks: int, freq_width: int,
                 time_masks: int, time_width: int) -> Tensor:
    """SpecAugment (frequency + time masking) drawing positions from ``gen`` so resumed runs mask identically."""
    B, F_, T = mel.shape
    mel = mel.clone()
    fill = mel.amin(dim=(1, 2), keepdim=True)
    for b in range(B):
        for _ in range(freq_masks):
            w = int(torch.randint(0, freq_width + 1, (1,), generator=gen))
            f0 = int(torch.randint(0, max(1, F_ - w), (1,), generator=gen))
            mel[b, f0 : f0 + w, :] = fill[b]
        n = int(lengths[b])
        for _ in range(time_masks):
            w = min(int(torch.randint(0, time_width + 1, (1,), generator=gen)), n // 5)
            t0 = int(torch.randint(0, max(1, n - w), (1,), generator=gen))
            mel[b, :, t0 : t0 + w] = fill[b]
    return mel


VQ_FIELDS = frozenset({"codebook_size", "commitment", "vq_decay", "restart_threshold"})
"""Config fields of the quantiser alone: what ``init_from`` a plain-ASR export may set beside ``vq: true``."""


class SpeechTokenizer(L.LightningModule):
    """Trains ``SpeechTokenizerModel`` on ASR; exports the handoff folder used by ``tokenize`` and stage 2."""

    def __init__(
        self,
        config: str = "tiny",
        overrides: dict[str, Any] | None = None,
        tokenizer: str = "data/builtin/tokenizer.json",
        init_from: str | None = None,
        lr: float = 1.5e-3,
        weight_decay: float = 0.01,
        warmup_steps: int = 100,
        min_lr_ratio: float = 0.05,
        ctc_weight: float = 0.3,
        vq_start: float = 0.35,
        kmeans_batches: int = 8,
        spec_augment: bool = True,
        val_decode_batches: int = 8,
        export_dir: str | None = "checkpoints/stage1/export",
        activation_checkpointing: bool = False,
        compile: bool = False,
    ) -> None:
        """
        Args:
            config: Preset of ``SpeechTokenizerConfig`` ("tiny", "whisper-large-v3-12.5hz").
            overrides: Field overrides of the preset, e.g. ``{codebook_size: 512, pool: 2}``.
            tokenizer: ``tokenizer.json`` of the transcripts (the prepared corpus's, or Whisper's for ``init_from``).
            init_from: Local Hugging Face Whisper folder (safetensors) to fine-tune from; None = random init.
            lr: Peak AdamW learning rate (paper: 1e-5 when fine-tuning whisper-large-v3).
            weight_decay: AdamW weight decay.
            warmup_steps: Linear warm-up steps before the cosine decay.
            min_lr_ratio: Final learning rate as a fraction of ``lr``.
            ctc_weight: Weight of the CTC loss beside the decoder cross-entropy (0 = off).
            vq_start: Fraction of the run (0..1) trained as plain ASR before the VQ is switched on; 0 = VQ from step 0.
            kmeans_batches: Batches of pooled features collected before ``vq_start`` for the k-means codebook init.
            spec_augment: Frequency/time masking on training mels.
            val_decode_batches: Validation batches decoded (greedy) for CER/WER; the loss uses all.
            export_dir: Where the ``Export`` callback writes the handoff folder at the end of fit.
            activation_checkpointing: Recompute each block in backward instead of storing its activations
                (FSDP runs only; trades ~30 % more compute for memory).
            compile: ``torch.compile`` each block (``distributed.apply_compile``; with FSDP after checkpoint
                wrapping, before sharding); the first step of each new batch shape is slower.
        """
        super().__init__()
        self.save_hyperparameters()
        self.model_config = SpeechTokenizerConfig.from_name(config, **(overrides or {}))
        self.text_tokenizer: TextTokenizer | None = None
        self.model: SpeechTokenizerModel | None = None
        self.logmel = LogMel(n_mels=self.model_config.n_mels)
        self.aug_gen = torch.Generator().manual_seed(0)
        self._kmeans_feats: list[Tensor] = []
        self._val: dict[str, list] = {}
        self._weights_source: dict[str, str] | None = None

    # ------------------------------------------------------------------ model
    def configure_model(self) -> None:
        if self.model is not None:
            return
        if self.hparams.init_from and self._init_from_speech_tokenizer(self.hparams.init_from):
            shard_or_compile(self, self.model, [*self.model.encoder.layers, *self.model.decoder.layers])
            return
        path = Path(self.hparams.tokenizer)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: model.tokenizer not found (run `python -m lit_keomni prepare` or point it at a tokenizer.json)")
        self.text_tokenizer = TextTokenizer.from_file(path)
        self.model_config = self.model_config.replace(vocab_size=self.text_tokenizer.vocab_size)
        self.model = SpeechTokenizerModel(self.model_config)
        if self.hparams.init_from:
            self._load_hf_whisper(self.hparams.init_from)
        if self.hparams.vq_start > 0 and self.model.encoder.quantizer is not None:
            self.model.encoder.use_vq = False
        shard_or_compile(self, self.model, [*self.model.encoder.layers, *self.model.decoder.layers])  # FSDP2 per block under ModelParallelStrategy

    def _init_from_speech_tokenizer(self, folder: str) -> bool:
        """``init_from`` a trained speech tokenizer: GLM-4-Voice's released folder or a stage-1 export (e.g. its
        import). Its network, codebook (which seeds the EMA state) and ASR vocabulary are taken as they are, the VQ
        is on from the first step; False for a plain Whisper folder."""
        from lit_keomni.checkpoints import export_kind, load_speech_tokenizer, read_config_json
        from lit_keomni.layouts.glm4voice_tokenizer import is_released_tokenizer
        from lit_keomni.release import SPEECH_TOKENIZER_FORMAT, load_released_speech_tokenizer

        kind = export_kind(folder)
        if kind is None and not is_released_tokenizer(read_config_json(folder)):
            return False
        overrides = dict(self.hparams.overrides or {})
        if kind is not None:
            if kind != EXPORT_KIND:
                raise ValueError(f"{Path(folder) / 'config.json'}: field 'kind' is {kind!r}; model.init_from takes a "
                                 f"Whisper folder, GLM-4-Voice's speech tokenizer or a {EXPORT_KIND!r} export")
            model, tokenizer, meta = load_speech_tokenizer(folder)
            self._weights_source = meta.get("weights_source")
            if model.encoder.quantizer is None and overrides.get("vq"):
                return self._insert_vq(model, tokenizer, overrides, folder)
        if overrides:
            raise ValueError(f"model.overrides {sorted(overrides)} cannot change the network of "
                             f"model.init_from={folder}; leave them out (a plain-ASR export takes {{vq: true}} and "
                             f"the VQ fields {sorted(VQ_FIELDS)})")
        if kind is None:
            own = Path(folder) / "tokenizer.json"
            model, tokenizer, _ = load_released_speech_tokenizer(folder, None if own.is_file() else self.hparams.tokenizer)
            self._weights_source = {"format": SPEECH_TOKENIZER_FORMAT, "folder": str(Path(folder).resolve())}
        self.text_tokenizer, self.model = tokenizer, model.train()
        self.model_config = model.config
        self.model.encoder.use_vq = True
        self.logmel = LogMel(n_mels=self.model_config.n_mels).to(self.logmel.filters.device)
        return True

    def _insert_vq(self, asr: Any, tokenizer: TextTokenizer, overrides: dict[str, Any], folder: str) -> bool:
        """A plain-ASR stage-1 export (``recipes/stage1_asr.yaml``) with the VQ inserted at its bottleneck, as the
        paper inserts it into a trained Whisper: every weight kept, the codebook initialised by k-means on the trained
        encoder's pooled features when the VQ switches on (``vq_start``)."""
        other = sorted(set(overrides) - VQ_FIELDS - {"vq"})
        if other:
            raise ValueError(f"model.overrides {other} cannot change the network of model.init_from={folder}; with a "
                             f"plain-ASR export only {{vq: true}} and the VQ fields {sorted(VQ_FIELDS)} apply")
        self.text_tokenizer, self.model_config = tokenizer, asr.config.replace(**overrides)
        self.model = SpeechTokenizerModel(self.model_config).train()
        load_state_checked(self.model, asr.state_dict(), folder, allow_missing=("encoder.quantizer.",))
        self.model.encoder.use_vq = False  # until the k-means init at vq_start
        self.logmel = LogMel(n_mels=self.model_config.n_mels).to(self.logmel.filters.device)
        return True

    def _load_hf_whisper(self, folder: str) -> None:
        hf_config, state = read_hf_folder(folder)
        ours = config_dict(self.model_config)
        hf_vocab = hf_config.get("vocab_size", 0)
        check_hf_whisper_config({k: v for k, v in hf_config.items() if k != "vocab_size"}, ours, f"{folder}/config.json")
        state = whisper_from_hf(state)
        emb = state.get("decoder.embed_tokens.weight")
        if emb is not None and emb.shape[0] < self.model_config.vocab_size:
            # Special tokens our tokenizer added after Whisper's vocabulary: new rows start at the mean embedding.
            extra = emb.mean(0, keepdim=True).expand(self.model_config.vocab_size - emb.shape[0], -1)
            state["decoder.embed_tokens.weight"] = torch.cat([emb, extra])
        elif hf_vocab > self.model_config.vocab_size:
            raise ValueError(f"{folder}/config.json: vocab_size {hf_vocab} is larger than model.tokenizer's {self.model_config.vocab_size}")
        load_state_checked(self.model, state, folder, allow_missing=("encoder.quantizer.", "ctc_head."))

    # ------------------------------------------------------------------ steps
    def _targets(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        """(B, L) bos + transcript + eos padded with pad, and the (B,) row lengths (a released vocabulary's pad may be
        its eos, so padding is told by position, not by id)."""
        tok = self.text_tokenizer
        rows = [[tok.bos_id, *tok.encode(t), tok.eos_id] for t in texts]
        limit = self.model_config.max_target_positions + 1
        for r, t in zip(rows, texts):
            if len(r) > limit:
                raise ValueError(f"transcript of {len(r)} tokens exceeds max_target_positions={limit - 1}: {t[:60]!r}")
        out = torch.full((len(rows), max(map(len, rows))), tok.pad_id, dtype=torch.long)
        for i, r in enumerate(rows):
            out[i, : len(r)] = torch.tensor(r)
        return out.to(self.device), torch.tensor([len(r) for r in rows], device=self.device)

    def _losses(self, batch: dict[str, Any], augment: bool) -> dict[str, Tensor]:
        mel, mel_lengths = self.logmel(batch["audio"], batch["audio_lengths"])
        if augment:
            mel = spec_augment(mel, mel_lengths, self.aug_gen, 2, 10, 2, 25)
        return self._loss_from_mel(batch, mel, mel_lengths)

    def _loss_from_mel(self, batch: dict[str, Any], mel: Tensor, mel_lengths: Tensor) -> dict[str, Tensor]:
        tokens, lengths = self._targets(batch["text"])
        logits, enc = self.model(mel, mel_lengths, tokens[:, :-1])
        pad = self.text_tokenizer.pad_id
        padding = torch.arange(tokens.shape[1] - 1, device=tokens.device)[None] >= (lengths - 1)[:, None]
        target = tokens[:, 1:].masked_fill(padding, -100)
        out = {"asr_loss": F.cross_entropy(logits.float().flatten(0, 1), target.flatten())}
        loss = out["asr_loss"]
        if self.hparams.ctc_weight > 0:
            ctc_logits, ctc_lengths = self.model.ctc_logits(enc)
            lab_lengths = lengths - 2  # without the start and end tokens
            out["ctc_loss"] = F.ctc_loss(ctc_logits.float().log_softmax(-1).transpose(0, 1),
                                         tokens[:, 1:].masked_fill(padding, 0), ctc_lengths, lab_lengths, blank=pad,
                                         zero_infinity=True)
            loss = loss + self.hparams.ctc_weight * out["ctc_loss"]
        if enc.vq is not None:
            out["commitment_loss"] = enc.vq.commitment_loss
            out["perplexity"], out["usage"] = enc.vq.perplexity, torch.as_tensor(enc.vq.usage)
            out["restarted"] = torch.as_tensor(float(enc.vq.restarted))
            loss = loss + enc.vq.commitment_loss
        out["loss"] = loss
        out["_pre_vq"], out["_lengths"], out["_enc"] = enc.pre_vq, enc.lengths, enc
        out["_mel"], out["_mel_lengths"], out["_tokens"] = mel, mel_lengths, tokens
        return out

    def _vq_start_step(self) -> int:
        return int(self.hparams.vq_start * self.trainer.max_steps) if self.trainer.max_steps > 0 else 0

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        out = self._losses(batch, augment=self.hparams.spec_augment)
        encoder = self.model.encoder
        if encoder.quantizer is not None and not encoder.use_vq:
            self._collect_kmeans(out["_pre_vq"], out["_lengths"])
            if self.global_step + 1 >= self._vq_start_step():
                self._switch_on_vq()
        bs = len(batch["text"])
        for k, v in out.items():
            if not k.startswith("_"):
                group = "vq" if k in ("perplexity", "usage", "restarted") else "train"
                self.log(f"{group}/{k}", v, prog_bar=k == "loss", batch_size=bs)
        self.log("vq/active", float(encoder.use_vq and encoder.quantizer is not None), batch_size=bs)
        self.log("train/audio_seconds", batch["audio_lengths"].sum().float() / SAMPLE_RATE, reduce_fx="sum", batch_size=bs)
        return out["loss"]

    def _collect_kmeans(self, feats: Tensor, lengths: Tensor) -> None:
        valid = torch.arange(feats.shape[1], device=feats.device)[None] < lengths[:, None]
        rows = feats[valid].detach().float().cpu()
        # rows of a NaN batch (skipped by NonFiniteGuard) would make every centroid NaN at the switch
        self._kmeans_feats.append(rows[torch.isfinite(rows).all(dim=1)])
        self._kmeans_feats = self._kmeans_feats[-self.hparams.kmeans_batches :]

    @torch.no_grad()
    def _switch_on_vq(self) -> None:
        q = self.model.encoder.quantizer
        feats = torch.cat(self._kmeans_feats).to(q.codebook.device)
        q.init_from_kmeans(feats, iters=20, seed=int(self.global_step))
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            for buf in q.buffers():
                torch.distributed.broadcast(buf, src=0)
        self.model.encoder.use_vq = True
        self._kmeans_feats = []

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        norm = grad_norm(self)
        if norm is not None:
            self.log("train/grad_norm", norm)

    # ------------------------------------------------------------------ validation
    def on_validation_epoch_start(self) -> None:
        self._val = {"ref": [], "hyp": [], "ctc": [], "lang": []}

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        out = self._losses(batch, augment=False)
        bs = len(batch["text"])
        self.log("val/loss", out["loss"], batch_size=bs, sync_dist=True, prog_bar=True)
        self.log("val/asr_loss", out["asr_loss"], batch_size=bs, sync_dist=True)
        if batch_idx >= self.hparams.val_decode_batches:
            return
        tok = self.text_tokenizer
        hyp = self.model.transcribe(out["_mel"], out["_mel_lengths"], [tok.bos_id], tok.eos_id,
                                    max_tokens=out["_tokens"].shape[1] + 10)
        ctc = self.model.ctc_greedy(out["_enc"], blank=tok.pad_id) if self.hparams.ctc_weight > 0 else []
        self._val["ref"] += batch["text"]
        self._val["hyp"] += [tok.decode(h) for h in hyp]
        self._val["ctc"] += [tok.decode(h) for h in ctc]
        self._val["lang"] += batch["language"]
        if batch_idx == 0:
            self._log_media(batch, out)

    def _log_media(self, batch: dict[str, Any], out: dict[str, Any]) -> None:
        exp = getattr(self.logger, "experiment", None)
        if self.global_rank != 0 or exp is None or not hasattr(exp, "add_audio"):
            return
        n_mel = int(out["_mel_lengths"][0])
        exp.add_image("val/mel", mel_spectrogram_image(out["_mel"][0, :, :n_mel].float().cpu()), self.global_step)
        n = int(batch["audio_lengths"][0])
        exp.add_audio("val/audio", batch["audio"][0, :n].float().cpu()[None], self.global_step, sample_rate=SAMPLE_RATE)
        exp.add_text("val/transcript", f"ref: {batch['text'][0]}  \nhyp: {self._val['hyp'][0]}", self.global_step)

    def on_validation_epoch_end(self) -> None:
        v = gather_lists(self._val)
        if not v["ref"]:
            return
        for name, hyps in (("", v["hyp"]), ("ctc_", v["ctc"])):
            if not hyps:
                continue
            scores = error_rate(v["ref"], hyps, v["lang"])
            for key in ("cer", "wer", "cer_zh", "cer_en", "wer_en"):
                if key in scores:
                    self.log(f"val/{name}{key}", float(scores[key]), rank_zero_only=True)

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> dict[str, Any]:
        h = self.hparams
        return adamw_with_schedule(self.named_parameters(), lr=h.lr, weight_decay=h.weight_decay, betas=(0.9, 0.98),
                                   warmup_steps=h.warmup_steps, total_steps=int(self.trainer.estimated_stepping_batches),
                                   min_lr_ratio=h.min_lr_ratio)

    # ------------------------------------------------------------------ checkpoint state
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["use_vq"] = bool(self.model.encoder.use_vq)
        checkpoint["kmeans_feats"] = self._kmeans_feats
        checkpoint["rng"] = {"aug": self.aug_gen.get_state(), **rng_state()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.configure_model()
        self.model.encoder.use_vq = checkpoint.get("use_vq", self.model.encoder.use_vq)
        self._kmeans_feats = checkpoint.get("kmeans_feats", [])
        if "rng" in checkpoint:
            self.aug_gen.set_state(checkpoint["rng"]["aug"])
            set_rng_state(checkpoint["rng"])

    # ------------------------------------------------------------------ handoff
    def export(self, out_dir: str | Path) -> Path:
        """Write the handoff folder: config, weights, tokenizer; the frame rate and codebook size for later stages.
        Sharded, every rank calls this (the weights are gathered) and rank 0 writes."""
        state = full_state_dict(self.model)
        if self.global_rank != 0:
            return Path(out_dir)
        c = self.model_config
        return write_export(
            out_dir,
            kind=EXPORT_KIND,
            config=config_dict(c),
            state_dict=state,
            extra={"frame_rate_hz": c.frame_rate_hz, "codebook_size": c.codebook_size, "sample_rate": SAMPLE_RATE,
                   "vq_active": bool(self.model.encoder.use_vq),
                   **({"weights_source": self._weights_source} if self._weights_source else {})},
            files={"tokenizer": self.text_tokenizer.save},
        )
