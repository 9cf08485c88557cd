"""Stage 2 — text-to-token model (GLM-4-Voice §2.2, Appendix B.3; Tables 7, 12, 13).

    python -m lit_keomni fit --config recipes/stage2.yaml

A decoder-only transformer (``nn/transformer.py``) that reads text and writes the stage-1 speech tokens, so that
interleaved speech-text data can be synthesised from text alone (``python -m lit_keomni interleave``) without ever
making audio. Sequence: ``text <|begin_of_audio|> speech <|end_of_audio|>``; cross-entropy on the speech tokens and the
end marker only. AdamW β = (0.9, 0.95), weight decay 0.1, warm-up then decay from ``lr`` to ``lr · min_lr_ratio``
(paper: 4e-4 → 4e-5). Validation also generates speech tokens for held-out text and reads them back with the stage-1
ASR decoder: the CER/WER of that transcript against the input text is the paper's content-preservation check.
Inputs: ``checkpoints/stage1/export`` (tokenizer, speech tokens). Output: ``checkpoints/stage2/export``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lit_keomni.checkpoints import lm_tokenizer, load_speech_tokenizer, write_export
from lit_keomni.configs import TransformerConfig, config_dict
from lit_keomni.distributed import full_state_dict, shard_or_compile
from lit_keomni.eval.asr import error_rate
from lit_keomni.generate import generate
from lit_keomni.lm import build_lm, flops_per_token, masked_lm_loss
from lit_keomni.nn.transformer import Transformer
from lit_keomni.release import check_lm_vocabulary, lm_source
from lit_keomni.text.templates import END_AUDIO, tts
from lit_keomni.training import Stage, check_same_vocabulary, gather_lists

EXPORT_KIND = "text_to_token"


class TextToToken(Stage):
    """Text -> speech tokens LM; exports the handoff folder read by ``interleave`` and stage 3."""

    def __init__(
        self,
        config: str = "tiny",
        overrides: dict[str, Any] | None = None,
        speech_export: str = "checkpoints/stage1/export",
        init_from: str | None = None,
        tokenizer: str | None = None,
        lr: float = 4e-4,
        min_lr_ratio: float = 0.1,
        weight_decay: float = 0.1,
        warmup_steps: int = 100,
        decay: str = "cosine",
        val_generate_batches: int = 2,
        speech_per_text_token: float = 6.0,
        export_dir: str | None = "checkpoints/stage2/export",
        activation_checkpointing: bool = False,
        compile: bool = False,
        loss_chunk: int = 0,
        lora: dict[str, Any] | None = None,
        merge_lora: bool = True,
    ) -> None:
        """
        Args:
            config: ``TransformerConfig`` preset ("tiny", "text-to-token-1.5b", ...); its vocab_size is replaced by
                the speech-extended tokenizer's.
            overrides: Field overrides of the preset, e.g. ``{n_layer: 4, n_embd: 256}``.
            speech_export: Stage-1 export: the speech tokens to produce, its tokenizer, and the ASR judge.
            init_from: Local released text LM folder (Llama, Qwen2, GLM / GLM-4 or ChatGLM layout, safetensors) to
                start from; its embeddings are extended with the speech tokens (the paper starts from a 1.5B text
                LM). Set ``tokenizer`` to the same folder.
            tokenizer: The LM's own vocabulary: a folder with ``tokenizer.json`` or GLM-4's ``tokenizer.model``
                (e.g. the ``init_from`` folder); None = the stage-1 export's text tokenizer. The data module must
                name the same.
            lr: Peak learning rate (paper: 4e-4).
            min_lr_ratio: Final learning rate as a fraction of ``lr`` (paper: 0.1).
            weight_decay: AdamW weight decay (paper: 0.1).
            warmup_steps: Linear warm-up steps.
            decay: "cosine" or "linear" decay after warm-up.
            val_generate_batches: Validation batches whose text is synthesised to speech tokens and judged by ASR.
            speech_per_text_token: Generation stops after this many speech tokens per text token (plus 8).
            export_dir: Where the ``Export`` callback writes the handoff folder at the end of fit.
            activation_checkpointing: Recompute each block in backward instead of storing its activations
                (FSDP runs only; trades ~30 % more compute for memory).
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
        self._judge: list[Any] = []  # the frozen stage-1 model, kept out of the state dict and the optimiser
        self._val: dict[str, list] = {}

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
        self.flops_per_token = flops_per_token(self.model)  # for MFU
        self.apply_lora(self.model)
        shard_or_compile(self, self.model, self.model.blocks)  # FSDP2 per block under ModelParallelStrategy

    def forward(self, idx: Tensor, target: Tensor | None = None) -> Any:
        """Logits of ``idx``; with ``target``, the per-token losses and predictions (``Transformer.forward``)."""
        return self.model(idx, targets=target, loss_chunk=self.hparams.loss_chunk)

    def on_fit_start(self) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        if dm is not None and hasattr(dm, "transform"):
            check_same_vocabulary(self.text_tokenizer, dm.transform.tokenizer,
                                  f"model.speech_export={self.hparams.speech_export!r}, model.tokenizer={self.hparams.tokenizer!r}",
                                  f"data.speech_export={dm.speech_export!r}, data.tokenizer={dm.tokenizer_file!r}")

    # ------------------------------------------------------------------ steps
    def _loss(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
        return masked_lm_loss(*self(batch["input"], batch["target"]), batch["target"])

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        loss, acc = self._loss(batch)
        self.log_loss("train", loss, acc, batch["input"].shape[0], "speech_token_acc")
        return loss

    def on_validation_epoch_start(self) -> None:
        self._val = {"ref": [], "hyp": [], "lang": []}

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        loss, acc = self._loss(batch)
        self.log_loss("val", loss, acc, batch["input"].shape[0], "speech_token_acc")
        if batch_idx < self.hparams.val_generate_batches:
            hyps = self.synthesize_and_transcribe(batch["text"])
            self._val["ref"] += batch["text"]
            self._val["hyp"] += hyps
            self._val["lang"] += batch["language"]

    @torch.no_grad()
    def generate_speech(self, texts: list[str], temperature: float = 0.0, top_k: int | None = None) -> list[list[int]]:
        """Speech tokens (codebook indices) for each text."""
        tok = self.text_tokenizer
        prompts = [tts(tok, t, None)[0] for t in texts]
        room = self.model.config.block_size - max(len(p) for p in prompts)  # one left-padded batch
        limits = [max(0, min(int(len(p) * self.hparams.speech_per_text_token) + 8, room)) for p in prompts]
        lo = tok.audio_token_offset
        out = generate(self.model, prompts, max_new_tokens=limits, temperature=temperature, top_k=top_k,
                       stop_ids=[tok.token_to_id(END_AUDIO)], pad_id=tok.pad_id,
                       allowed_ids=(lo, lo + tok.num_audio_tokens))
        return [tok.ids_to_speech(ids) for ids in out]

    @torch.no_grad()
    def synthesize_and_transcribe(self, texts: list[str]) -> list[str]:
        """Generate speech tokens for ``texts`` and read them back with the stage-1 ASR decoder."""
        if not self._judge:
            judge, judge_tok, _ = load_speech_tokenizer(self.hparams.speech_export)
            self._judge = [judge, judge_tok]
        judge, judge_tok = self._judge
        judge.to(self.device)
        codes = self.generate_speech(texts)
        lengths = torch.tensor([max(1, len(c)) for c in codes], device=self.device)
        padded = torch.zeros(len(codes), int(lengths.max()), dtype=torch.long, device=self.device)
        for i, c in enumerate(codes):
            padded[i, : len(c)] = torch.tensor(c, dtype=torch.long)
        ids = judge.transcribe_codes(padded, lengths, [judge_tok.bos_id], judge_tok.eos_id, max_tokens=120)
        return [judge_tok.decode(i) for i in ids]

    def on_validation_epoch_end(self) -> None:
        v = gather_lists(self._val)
        if not v["ref"]:
            return
        scores = error_rate(v["ref"], v["hyp"], v["lang"])
        for key in ("cer", "wer", "cer_zh", "wer_en"):
            if key in scores:
                self.log(f"val/generated_{key}", float(scores[key]), rank_zero_only=True)
        self.log_text("val/generated", f"text: {v['ref'][0]}  \nASR of generated tokens: {v['hyp'][0]}")

    # ------------------------------------------------------------------ optimisation & state
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
            extra={"speech_tokenizer": {"frame_rate_hz": m["frame_rate_hz"], "codebook_size": m["codebook_size"],
                                        "export": str(Path(self.hparams.speech_export).resolve())},
                   "weights_source": self.weights_source, **lora_meta},
            files={"tokenizer": self.text_tokenizer.save, **lora_files},
        )
