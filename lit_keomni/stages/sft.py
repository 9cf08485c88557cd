"""Stage 4 — supervised fine-tuning for spoken dialogue, in two modes.

    python -m lit_keomni fit --config recipes/stage4.yaml          # discrete (GLM-4-Voice)
    python -m lit_keomni fit --config recipes/stage4_keomni.yaml   # continuous (KE-Omni)

``discrete`` (GLM-4-Voice, seed 003 §2.3.2, §2.4, Appendix F): the stage-3 speech LM continues on whole dialogues
written in speech tokens with the "text_guided" (text answer, then its speech) or "direct" template; cross-entropy on
the assistant parts only. Paper: batch 64, sequence length 4096, 10 epochs, AdamW, lr 5e-5 decaying to 5e-6.
Export: kind ``speech_lm`` (``stage: sft``), loaded by ``checkpoints.load_lm``.

``continuous`` (KE-Omni, seed 000 §4.1-4.2, §5.1): a frozen Whisper-style encoder (a stage-1 export's layers below
its pooling, or a local Hugging Face Whisper folder) gives 50 Hz states; the speech adapter stacks 5 frames (10 Hz)
and maps them into the LLM's width; the LLM reads the prompt's text embeddings with these features in the user's
speech slots and answers in text; cross-entropy on the answers. The adapter trains, the LLM too unless
``freeze_llm``; the encoder never (eval mode, no gradient, not in the optimiser). Paper: batch 256, 5 epochs, peak
lr 1e-4. Validation also answers the last question of a few held-out dialogues (with their history) and logs the
answer's CER against the reference (``val/answer_cer``). Export: kind ``keomni_lm``, loaded by ``checkpoints.load_keomni``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lit_keomni.checkpoints import (CONFIG_FILE, WEIGHTS_FILE, export_kind, load_speech_tokenizer, load_state_checked, lm_tokenizer,
                                    read_export_meta, read_hf_folder, whisper_from_hf, write_export)
from lit_keomni.configs import SpeechTokenizerConfig, TransformerConfig, config_dict
from lit_keomni.distributed import full_state_dict, shard_or_compile
from lit_keomni.eval.asr import error_rate
from lit_keomni.lm import build_lm, flops_per_token, is_export, masked_lm_loss
from lit_keomni.nn.adapter import SpeechAdapter
from lit_keomni.nn.keomni import KeOmni, llm_tokenizer
from lit_keomni.nn.whisper import SpeechEncoder
from lit_keomni.text.templates import KEOMNI_SYSTEM_PROMPT, KEOMNI_TRANSCRIBE_PROMPT, check_sft_options
from lit_keomni.text.tokenizer import TextTokenizer
from lit_keomni.release import check_lm_vocabulary, lm_source
from lit_keomni.training import Stage, check_same_vocabulary, gather_lists

EXPORT_KINDS = {"discrete": "speech_lm", "continuous": "keomni_lm"}


def whisper_encoder_config(hf: dict[str, Any], *, source: str) -> SpeechTokenizerConfig:
    """A Hugging Face ``WhisperConfig`` (config.json dict) -> our config of its whole encoder at 50 Hz: no pooling,
    no VQ, Whisper's non-causal stem and bidirectional attention."""
    need = ("d_model", "encoder_attention_heads", "encoder_ffn_dim", "encoder_layers", "num_mel_bins")
    missing = [f for f in need if f not in hf]
    if missing:
        raise ValueError(f"{source}: field(s) {missing} missing; encoder_from must be a Whisper folder or a stage-1 export")
    return SpeechTokenizerConfig(
        n_mels=hf["num_mel_bins"], d_model=hf["d_model"], n_head=hf["encoder_attention_heads"],
        ffn_dim=hf["encoder_ffn_dim"], encoder_layers=hf["encoder_layers"], vq_position=hf["encoder_layers"],
        decoder_layers=0, vocab_size=hf.get("vocab_size", 0), max_source_positions=hf.get("max_source_positions", 1500),
        pool=1, causal_conv=False, block_seconds=None, vq=False)


def load_speech_encoder(path: str | Path) -> SpeechEncoder:
    """KE-Omni's speech encoder at 50 Hz: from a stage-1 export, its stem and layers below the pooling (the layers
    above, the VQ and the ASR decoder are left out); from a local Hugging Face Whisper folder, the whole encoder."""
    if is_export(path):
        model, _, _ = load_speech_tokenizer(path)
        c = model.config
        encoder = SpeechEncoder(c.replace(encoder_layers=c.vq_position, vq=False))
        own = encoder.state_dict()
        load_state_checked(encoder, {k: v for k, v in model.encoder.state_dict().items() if k in own},
                           str(Path(path) / WEIGHTS_FILE))
        return encoder
    hf_config, state = read_hf_folder(path)
    encoder = SpeechEncoder(whisper_encoder_config(hf_config, source=str(Path(path) / CONFIG_FILE)))
    ours = {k.removeprefix("encoder."): v for k, v in whisper_from_hf(state).items() if k.startswith("encoder.")}
    load_state_checked(encoder, ours, str(path))
    return encoder


class SFT(Stage):
    """Spoken-dialogue SFT: ``discrete`` (GLM-4-Voice speech LM) or ``continuous`` (KE-Omni encoder + adapter + LLM)."""

    def __init__(
        self,
        mode: str = "discrete",
        config: str = "tiny",
        overrides: dict[str, Any] | None = None,
        init_from: str | None = "checkpoints/stage3/export",
        speech_export: str = "checkpoints/stage1/export",
        template: str = "text_guided",
        encoder_from: str = "checkpoints/stage1/export",
        tokenizer: str | None = None,
        freeze_llm: bool = False,
        target: str = "answer",
        stack: int = 5,
        adapter_hidden: int | None = None,
        lr: float = 5e-5,
        min_lr_ratio: float = 0.1,
        weight_decay: float = 0.1,
        warmup_steps: int = 100,
        decay: str = "linear",
        val_generate_batches: int = 1,
        max_answer_tokens: int = 64,
        export_dir: str | None = "checkpoints/stage4/export",
        activation_checkpointing: bool = False,
        compile: bool = False,
        loss_chunk: int = 0,
        lora: dict[str, Any] | None = None,
        merge_lora: bool = True,
    ) -> None:
        """
        Args:
            mode: "discrete" (GLM-4-Voice: speech tokens in and out) or "continuous" (KE-Omni: audio in, text out).
            config: ``TransformerConfig`` preset of the LLM when it starts random or from a Hugging Face folder; an
                LM export brings its own sizes (only ``block_size`` is taken from here).
            overrides: Field overrides of the preset, e.g. ``{n_layer: 4, n_embd: 256, block_size: 640}``.
            init_from: The LLM to start from: the stage-3 export (kind speech_lm), a local released LM folder
                (Llama, Qwen2, GLM / GLM-4 or ChatGLM layout, e.g. glm-4-voice-9b; set ``tokenizer`` to it too),
                or null for a random LLM (tests, timing). Continuous mode also takes a KE-Omni export (kind
                keomni_lm, e.g. the alignment run's): its LLM and its adapter, which must have been trained on
                ``encoder_from``.
            speech_export: Stage-1 export: the speech tokens' codebook and the speech-extended tokenizer (used when
                ``init_from`` is not an LM export, which brings its own tokenizer).
            template: Discrete mode: "text_guided" or "direct" (seed 003 Appendix F), or "streaming" (the released
                glm-4-voice-9b's interleaved answers: fine-tune it in the format it was released with).
            encoder_from: Continuous mode: the frozen speech encoder, a stage-1 export (its 50 Hz layers below the
                pooling) or a local Hugging Face Whisper folder (whisper-large-v3 in the paper).
            tokenizer: A released LLM's own vocabulary (a folder with ``tokenizer.json`` or GLM-4's
                ``tokenizer.model``). Continuous mode: the role tokens are added; discrete mode: the speech tokens
                of ``speech_export`` too, or those it already holds (glm-4-voice-9b's ``<|audio_N|>``). None = the
                speech-extended tokenizer of ``speech_export``. The data module must name the same.
            freeze_llm: Continuous mode: train only the adapter.
            target: Continuous mode: "answer" (SFT) or "transcript" (adapter alignment: the model writes the user's
                own words under ``KEOMNI_TRANSCRIBE_PROMPT``; ``val/answer_cer`` is then the ASR CER). The data
                module must have the same target.
            stack: Continuous mode: encoder frames per adapter frame (KE-Omni: 5, 50 Hz -> 10 Hz).
            adapter_hidden: Width of the adapter's hidden layer; None = the LLM's width.
            lr: Peak learning rate (GLM-4-Voice SFT: 5e-5; KE-Omni: 1e-4).
            min_lr_ratio: Final learning rate as a fraction of ``lr`` (GLM-4-Voice: 5e-6 / 5e-5 = 0.1).
            weight_decay: AdamW weight decay (not given in the papers).
            warmup_steps: Linear warm-up steps.
            decay: "linear" or "cosine" decay after warm-up.
            val_generate_batches: Continuous mode: validation batches whose last questions are answered and scored.
            max_answer_tokens: Longest generated answer in validation.
            export_dir: Where the ``Export`` callback writes the handoff folder at the end of fit.
            activation_checkpointing: Recompute each LLM block in backward (FSDP runs only).
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
        check_sft_options("SFT", mode, template, tokenizer, target)
        self.save_hyperparameters()
        self.model_config = TransformerConfig.from_name(config, **(overrides or {}))
        self.model: Any = None
        self.text_tokenizer: TextTokenizer | None = None
        self.speech_meta: dict[str, Any] = {}
        self._val: dict[str, list] = {}

    @property
    def llm(self) -> Any:
        return self.model if self.hparams.mode == "discrete" else self.model.llm

    # ------------------------------------------------------------------ model
    def _tokenizer(self) -> tuple[TextTokenizer, dict[str, Any]]:
        """The LLM's vocabulary (an LM export's own, an LLM's tokenizer.json, or the stage-1 export's extended) and
        the speech-tokenizer facts the export records."""
        h = self.hparams
        if h.init_from and is_export(h.init_from):
            tokenizer = TextTokenizer.from_file(Path(h.init_from) / "tokenizer.json")
            meta = json.loads((Path(h.init_from) / CONFIG_FILE).read_text(encoding="utf-8")).get("speech_tokenizer")
            if meta is not None:
                return tokenizer, dict(meta)
        elif h.tokenizer and h.mode == "continuous":
            return llm_tokenizer(h.tokenizer), {}
        else:
            tokenizer, _ = lm_tokenizer(h.speech_export, h.tokenizer)
        m = read_export_meta(h.speech_export, "speech_tokenizer")
        return tokenizer, {"frame_rate_hz": m["frame_rate_hz"], "codebook_size": m["codebook_size"],
                           "export": str(Path(h.speech_export).resolve())}

    def configure_model(self) -> None:
        if self.model is not None:
            return
        h = self.hparams
        self.text_tokenizer, self.speech_meta = self._tokenizer()
        check_lm_vocabulary(h.init_from, self.text_tokenizer,
                            f"model.speech_export={h.speech_export!r}, model.tokenizer={h.tokenizer!r}")
        self.weights_source = lm_source(h.init_from)  # the released layout an export goes back to
        encoder = load_speech_encoder(h.encoder_from) if h.mode == "continuous" else None
        if encoder is not None and h.init_from and export_kind(h.init_from) == "keomni_lm":
            llm, adapter = self._from_keomni(h.init_from, encoder)
        else:
            llm = build_lm(self.model_config, self.text_tokenizer.vocab_size, h.init_from)
            adapter = None
        self.model_config = llm.config
        self.flops_per_token = flops_per_token(llm)  # for MFU
        if h.lora and h.freeze_llm:
            raise ValueError("model.lora trains adapters in the LLM, model.freeze_llm freezes it: choose one")
        self.apply_lora(llm)
        if encoder is None:
            self.model, blocks = llm, list(llm.blocks)
        else:
            if adapter is None:
                adapter = SpeechAdapter(encoder.config.d_model, llm.config.n_embd, h.stack, h.adapter_hidden)
            if h.freeze_llm:
                llm.requires_grad_(False)
            self.model = KeOmni(encoder, adapter, llm, freeze_encoder=True)
            blocks = [*encoder.layers, *llm.blocks]  # stem and adapter stay in the root group
        shard_or_compile(self, self.model, blocks)  # FSDP2 per block under ModelParallelStrategy

    def _from_keomni(self, path: str, encoder: SpeechEncoder) -> tuple[Any, SpeechAdapter]:
        """The LLM (with this recipe's block_size) and the adapter of a KE-Omni export, checked against this run's
        encoder (weights, wherever it lives) and stacking."""
        from lit_keomni.checkpoints import load_keomni

        h = self.hparams
        model, _, _ = load_keomni(path, block_size=self.model_config.block_size)
        where = Path(path) / CONFIG_FILE
        theirs, ours = model.encoder.state_dict(), encoder.state_dict()
        if theirs.keys() != ours.keys() or any(not torch.equal(theirs[k], v) for k, v in ours.items()):
            raise ValueError(f"{path}: its encoder is not model.encoder_from {h.encoder_from!r} (other weights): its "
                             f"adapter was trained on another encoder; name the encoder of that run ({where} field "
                             "'encoder_from')")
        if model.stack != h.stack:
            raise ValueError(f"{where}: the adapter stacks {model.stack} frames, but model.stack is {h.stack}")
        if h.adapter_hidden is not None and model.adapter.hidden != h.adapter_hidden:
            raise ValueError(f"{where}: the adapter's hidden width is {model.adapter.hidden}, but "
                             f"model.adapter_hidden is {h.adapter_hidden}")
        return model.llm.train(), model.adapter.train()

    def forward(self, batch: dict[str, Any], target: Tensor | None = None) -> Any:
        """Logits of the batch; with ``target``, the per-token losses and predictions (``Transformer.forward``)."""
        chunk = self.hparams.loss_chunk
        if self.hparams.mode == "discrete":
            return self.model(batch["input"], targets=target, loss_chunk=chunk)
        mel, mel_lengths = self.model.logmel(batch["audio"], batch["audio_lengths"])
        return self.model(batch["input"], batch["speech_mask"], mel, mel_lengths, targets=target, loss_chunk=chunk)

    def on_fit_start(self) -> None:
        """The data must be written in this model's vocabulary (and, continuous, with its stacking)."""
        dm = getattr(self.trainer, "datamodule", None)
        if dm is None or not hasattr(dm, "mode"):
            return
        h = self.hparams
        if dm.mode != h.mode:
            raise ValueError(f"data.mode is {dm.mode!r} but model.mode is {h.mode!r}")
        if h.mode == "continuous" and dm.stack != h.stack:
            raise ValueError(f"data.stack is {dm.stack} but model.stack is {h.stack}: speech slots would not match frames")
        target = getattr(dm, "target", "answer")
        if target != h.target:
            raise ValueError(f"data.target is {target!r} but model.target is {h.target!r}")
        check_same_vocabulary(self.text_tokenizer, dm.tokenizer,
                              f"model.init_from={h.init_from!r}, model.tokenizer={h.tokenizer!r}",
                              f"data.speech_export={dm.speech_export!r}, data.tokenizer={dm.tokenizer_file!r}")

    # ------------------------------------------------------------------ steps
    def _loss(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
        return masked_lm_loss(*self(batch, batch["target"]), batch["target"])

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        loss, acc = self._loss(batch)
        self.log_loss("train", loss, acc, batch["input"].shape[0], "assistant_acc")
        return loss

    def on_validation_epoch_start(self) -> None:
        self._val = {"ref": [], "hyp": [], "lang": []}

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        loss, acc = self._loss(batch)
        self.log_loss("val", loss, acc, batch["input"].shape[0], "assistant_acc")
        if self.hparams.mode == "continuous" and batch_idx < self.hparams.val_generate_batches:
            hyps, refs = self.answer_last_questions(batch)
            self._val["ref"] += refs
            self._val["hyp"] += hyps
            self._val["lang"] += batch["language"]

    @torch.no_grad()
    def answer_last_questions(self, batch: dict[str, Any]) -> tuple[list[str], list[str]]:
        """Continuous mode: answer each dialogue's last question after its earlier exchanges; (answers, references)."""
        wavs = [a[:n] for a, n in zip(batch["audio"], batch["audio_lengths"].tolist())]
        rows = batch["turn_row"].tolist()
        questions, histories = [], []
        for r, answers in enumerate(batch["answers"]):
            turns = [w for w, row in zip(wavs, rows) if row == r]
            questions.append(turns[-1])
            histories.append(list(zip(turns[:-1], answers[:-1])))
        prompt = KEOMNI_TRANSCRIBE_PROMPT if self.hparams.target == "transcript" else KEOMNI_SYSTEM_PROMPT
        hyps = self.model.respond(self.text_tokenizer, questions, history=histories,
                                  max_new_tokens=self.hparams.max_answer_tokens, system_prompt=prompt)
        return hyps, [a[-1] for a in batch["answers"]]

    def on_validation_epoch_end(self) -> None:
        v = gather_lists(self._val)
        if not v["ref"]:
            return
        scores = error_rate(v["ref"], v["hyp"], v["lang"])
        self.log("val/answer_cer", float(scores["cer"]), rank_zero_only=True)
        self.log_text("val/answer", f"reference: {v['ref'][0]}  \nanswer: {v['hyp'][0]}")

    # ------------------------------------------------------------------ optimisation & state
    # ------------------------------------------------------------------ handoff
    def export(self, out_dir: str | Path) -> Path:
        """Write the handoff folder. Sharded, every rank calls this (the weights are gathered) and rank 0 writes."""
        state = full_state_dict(self.model)
        if self.global_rank != 0:
            return Path(out_dir)
        h = self.hparams
        state, lora_files, lora_meta = self.export_weights(state)
        files = {"tokenizer": self.text_tokenizer.save, **lora_files}
        if h.mode == "discrete":
            return write_export(out_dir, kind=EXPORT_KINDS["discrete"], config=config_dict(self.model_config),
                                state_dict=state, files=files,
                                extra={"stage": "sft", "template": h.template, "speech_tokenizer": self.speech_meta,
                                       "weights_source": self.weights_source, **lora_meta})
        extra = {"stage": "sft", "target": h.target, "encoder_from": str(Path(h.encoder_from).resolve()),
                 "init_from": str(Path(h.init_from).resolve()) if h.init_from else None, "weights_source": self.weights_source,
                 **lora_meta}
        if self.speech_meta:
            extra["speech_tokenizer"] = self.speech_meta
        return write_export(out_dir, kind=EXPORT_KINDS["continuous"], config=self.model.config_dict(),
                            state_dict=state, extra=extra, files=files)

