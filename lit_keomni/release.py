"""Released language models in and out of the LM stages (stages 2-4, ``chat``, ``eval``).

In: a released LM folder (Llama-3.x, Qwen2.5, GLM-4 in transformers' ``Glm``/``Glm4`` layout or THUDM's ChatGLM
remote-code layout of glm-4-9b / glm-4-voice-9b) is an ``init_from`` of every LM stage, and ``import_lm`` turns one
(with its own vocabulary, extended by a stage-1 export's speech tokens where they are missing) into an LM export, so
``chat --pipeline glm`` and ``eval`` run glm-4-voice-9b as released.

Out: every LM export records where its weights came from (``weights_source``: the layout and the folder), and ``release``
writes it back in that layout (or another one): weights and ``config.json`` through ``lit_keomni.layouts``, the
vocabulary in the released files (``tokenizer.json`` / GLM-4's ``tokenizer.model``, with ``tokenizer_config.json``),
and the source folder's remote code (``*.py``) and ``generation_config.json`` beside them, so transformers, vLLM,
SGLang and the reference code load the fine-tuned model as they loaded the released one.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from lit_keomni.atomic import staged_dir
from lit_keomni.audio import SAMPLE_RATE
from lit_keomni.checkpoints import (CONFIG_FILE, export_kind, load_export, lm_tokenizer, read_export_meta,
                                    read_vocabulary, write_export)
from lit_keomni.configs import TransformerConfig, config_dict

VOCABULARY_FILES = ("tokenizer.json", "tokenizer.model")
"""The files that make a released folder's vocabulary: Hugging Face ``tokenizers`` JSON, or GLM-4's tiktoken ranks."""
CARRIED_FILES = ("generation_config.json", "special_tokens_map.json")
"""Files of the source folder a release carries over unchanged (beside its ``*.py`` remote code)."""
IMPORT_STAGES = ("pretrain", "sft")
DECODER_FORMAT = "glm-4-voice-decoder"
"""The released layout of a flow_decoder export: config.yaml, flow.pt, hift.pt."""


def vocabulary_file(folder: str | Path) -> Path | None:
    """The vocabulary file of a released folder, or None when it has none."""
    for name in VOCABULARY_FILES:
        if (Path(folder) / name).is_file():
            return Path(folder) / name
    return None


def lm_source(init_from: str | Path | None) -> dict[str, str] | None:
    """Where an LM stage's weights come from, for its export to record: a released folder gives its layout and path;
    an LM export passes on the ``weights_source`` it records; random weights give None."""
    if not init_from:
        return None
    kind = export_kind(init_from)
    if kind is not None:
        return read_export_meta(init_from, kind).get("weights_source") or None
    from lit_keomni.layouts import lm_format

    return {"format": lm_format(init_from), "folder": str(Path(init_from).resolve())}


def check_lm_vocabulary(init_from: str | Path | None, tokenizer: Any, names: str) -> None:
    """A released LM's rows are its own vocabulary's ids: the stage's vocabulary (``names`` says which options chose
    it) must give every token of ``init_from``'s vocabulary the same id, or one error names the first that differs.
    Exports (which carry the vocabulary they were trained with) and folders without a vocabulary pass."""
    if not init_from or export_kind(init_from) is not None:
        return
    path = vocabulary_file(init_from)
    if path is None:
        return
    ours = tokenizer.backend.get_vocab(with_added_tokens=True)
    theirs = read_vocabulary(init_from).backend.get_vocab(with_added_tokens=True)
    wrong = sorted((i, t) for t, i in theirs.items() if ours.get(t) != i)
    if wrong:
        i, t = wrong[0]
        raise ValueError(f"{path}: the vocabulary the weights of {init_from} were trained with does not match the "
                         f"stage's ({names}): token {t!r} is id {i} there but {ours.get(t)} here ({len(wrong)} of "
                         f"{len(theirs)} tokens differ); set model.tokenizer and data.tokenizer to {init_from}")


def import_lm(folder: str | Path, speech_export: str | Path, out: str | Path, *, stage: str = "sft",
              template: str = "text_guided") -> Path:
    """A released LM folder -> a ``speech_lm`` export (weights in our names, the folder's own vocabulary extended
    with ``speech_export``'s speech tokens where they are missing). ``stage`` "sft" marks a spoken-dialogue model
    (glm-4-voice-9b) that ``chat --pipeline glm`` answers with in ``template``; "pretrain" a speech LM for ``eval``."""
    from lit_keomni.layouts import lm_format, load_lm_folder
    from lit_keomni.lm import build_lm

    if stage not in IMPORT_STAGES:
        raise ValueError(f"import lm: stage must be one of {IMPORT_STAGES}, got {stage!r}")
    lm_format(folder)  # another architecture: one error naming config.json's field, before anything else is read
    if vocabulary_file(folder) is None:
        raise FileNotFoundError(f"{folder}: no vocabulary (expected one of {VOCABULARY_FILES})")
    tokenizer, meta = lm_tokenizer(speech_export, folder)
    config, _, _ = load_lm_folder(folder)
    model = build_lm(config, tokenizer.vocab_size, str(folder), keep=())
    extra: dict[str, Any] = {
        "stage": stage,
        "speech_tokenizer": {"frame_rate_hz": meta["frame_rate_hz"], "codebook_size": meta["codebook_size"],
                             "export": str(Path(speech_export).resolve())},
        "weights_source": lm_source(folder),
    }
    if stage == "sft":
        extra["template"] = template
    return write_export(out, kind="speech_lm", config=config_dict(model.config), state_dict=model.state_dict(),
                        extra=extra, files={"tokenizer": tokenizer.save})


SPEECH_TOKENIZER_FORMAT = "glm4voice-tokenizer"
"""The released speech-tokenizer layout: GLM-4-Voice's ``WhisperVQForConditionalGeneration``."""


def import_speech_tokenizer(folder: str | Path, out: str | Path, *, tokenizer: str | Path | None = None) -> Path:
    """GLM-4-Voice's released speech tokenizer folder -> a stage-1 export (``tokenize``, ``chat --pipeline glm``,
    stage 2 data, and stage 1's ``init_from`` to fine-tune it). The ASR decoder's vocabulary is the folder's
    ``tokenizer.json`` or ``tokenizer`` (whisper-large-v3's, whose vocabulary the released tokenizer keeps)."""
    model, text_tokenizer, _ = load_released_speech_tokenizer(folder, tokenizer)
    c = model.config
    return write_export(
        out, kind="speech_tokenizer", config=config_dict(c), state_dict=model.state_dict(),
        extra={"frame_rate_hz": c.frame_rate_hz, "codebook_size": c.codebook_size, "sample_rate": SAMPLE_RATE,
               "vq_active": True, "weights_source": {"format": SPEECH_TOKENIZER_FORMAT,
                                                     "folder": str(Path(folder).resolve())}},
        files={"tokenizer": text_tokenizer.save})


def load_released_speech_tokenizer(folder: str | Path, tokenizer: str | Path | None = None) -> tuple[Any, Any, dict]:
    """(``SpeechTokenizerModel`` with the released weights, the ASR ``TextTokenizer``, the released config.json);
    decoder rows are added for special tokens our tokenizer appends (at the mean embedding, as stage 1 does for
    Whisper). Every wrong input is one error naming the file and field or weight."""
    from lit_keomni.checkpoints import load_state_checked, read_hf_folder
    from lit_keomni.layouts import glm4voice_tokenizer as layout
    from lit_keomni.nn.whisper import SpeechTokenizerModel

    folder = Path(folder)
    cfg = folder / CONFIG_FILE
    hf, state = read_hf_folder(folder)
    if "kind" in hf:
        raise ValueError(f"{cfg}: field 'kind' is {hf['kind']!r}: an export folder of ours, not a released tokenizer")
    if not layout.is_released_tokenizer(hf):
        raise ValueError(f"{cfg}: field 'architectures' is {hf.get('architectures')!r} and 'quantize_vocab_size' is "
                         f"missing; expected GLM-4-Voice's speech tokenizer ({layout.ARCHITECTURES[0]})")
    config = layout.config_from_released(hf, source=str(cfg))
    fe = folder / "preprocessor_config.json"
    if fe.is_file():
        layout.check_feature_extractor(json.loads(fe.read_text(encoding="utf-8")), config, str(fe))
    vocab = Path(tokenizer) if tokenizer else folder / "tokenizer.json"
    if not vocab.is_file():
        raise FileNotFoundError(f"{vocab}: missing; the ASR decoder needs its vocabulary: give --tokenizer the "
                                f"tokenizer.json of whisper-large-v3 (the released tokenizer keeps its vocabulary)")
    text_tokenizer = asr_vocabulary(vocab)
    if text_tokenizer.vocab_size < config.vocab_size:
        raise ValueError(f"{vocab}: {text_tokenizer.vocab_size} tokens, but {cfg} field 'vocab_size' is "
                         f"{config.vocab_size}: not the vocabulary the decoder was trained with")
    ours = layout.from_released(state, config, source=str(folder / "model.safetensors"))
    config = config.replace(vocab_size=text_tokenizer.vocab_size)
    emb = ours["decoder.embed_tokens.weight"]
    if emb.shape[0] < config.vocab_size:
        extra = emb.mean(0, keepdim=True).expand(config.vocab_size - emb.shape[0], -1)
        ours["decoder.embed_tokens.weight"] = torch.cat([emb, extra])
    model = SpeechTokenizerModel(config)
    load_state_checked(model, ours, str(folder / "model.safetensors"), allow_missing=("ctc_head.",))
    return model.eval(), text_tokenizer, hf


WHISPER_END = "<|endoftext|>"


def asr_vocabulary(path: Path) -> Any:
    """The released tokenizer's ASR vocabulary with its own roles, so no token is added and the decoder keeps its
    rows: those its ``tokenizer_config.json`` names, else Whisper's (``<|endoftext|>`` for pad, bos and eos, as
    Whisper's tokenizer_config.json gives them); a vocabulary with neither gets ours appended."""
    from lit_keomni.text.tokenizer import TextTokenizer

    if path.name == "tokenizer.json" and (path.parent / "tokenizer_config.json").is_file():
        return TextTokenizer.from_folder(path.parent)
    tokenizer = TextTokenizer.from_file(path)
    backend = tokenizer.backend
    if tokenizer.released_format is None and backend.token_to_id(WHISPER_END) is not None:
        from tokenizers import Tokenizer

        return TextTokenizer(Tokenizer.from_file(str(path)), roles=dict.fromkeys(("pad", "bos", "eos"), WHISPER_END),
                             released={"format": "tokenizer.json", "config": {}}, source=str(path))
    return tokenizer


def release_speech_tokenizer(export: str | Path, out: str | Path) -> Path:
    """A stage-1 export of a released tokenizer's network (its import, or stage 1 fine-tuned from it) -> the released
    layout (config.json, model.safetensors, preprocessor_config.json, the ASR vocabulary), which GLM-4-Voice's
    ``load_quantize_encoder`` / ``WhisperVQForConditionalGeneration.from_pretrained`` load."""
    from lit_keomni.configs import SpeechTokenizerConfig
    from lit_keomni.layouts import glm4voice_tokenizer as layout
    from lit_keomni.layouts import write_released_folder

    exp = load_export(export, "speech_tokenizer")
    cfg = exp.path / CONFIG_FILE
    config = SpeechTokenizerConfig.from_dict(exp.config, source=str(cfg))
    try:
        hf = layout.released_config_json(config, next(iter(exp.state_dict.values())).dtype)
    except ValueError as e:
        raise ValueError(f"{cfg}: {e}") from None
    state = layout.to_released(exp.state_dict, config)
    source = exp.meta.get("weights_source") or {}
    with staged_dir(out) as tmp:
        write_released_folder(tmp, state, hf)
        (tmp / "preprocessor_config.json").write_text(json.dumps(layout.feature_extractor_json(config), indent=2)
                                                      + "\n", encoding="utf-8")
        shutil.copy2(exp.path / "tokenizer.json", tmp / "tokenizer.json")
        origin = Path(source["folder"]) if source.get("folder") else None
        if origin is not None and origin.is_dir():
            for name in ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
                         "merges.txt", "normalizer.json"):
                if (origin / name).is_file() and not (tmp / name).exists():
                    shutil.copy2(origin / name, tmp / name)
    return Path(out)


def release_glm4voice_decoder(export: str | Path, out: str | Path) -> Path:
    """A "flow_decoder" export (stage 7 flow trained here, or an imported decoder fine-tuned) and its ``mel_vocoder``
    -> a glm-4-voice-decoder folder (config.yaml, flow.pt, hift.pt), the layout the reference's ``flow_inference.py``
    and ``import glm4voice-decoder`` read."""
    from lit_keomni.checkpoints import load_flow_decoder, load_mel_vocoder
    from lit_keomni.layouts.glm4voice_decoder import flow_state_to_released, released_config_yaml
    from lit_keomni.nn.hift import hift_state_to_released
    from lit_keomni.token2wav import VOCODER_DIR, check_decoder_vocoder

    flow, meta = load_flow_decoder(export)
    vocoder = Path(export) / VOCODER_DIR
    if not (vocoder / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{vocoder}: missing; a released decoder folder holds the HiFT too: train the flow "
                                f"with model.mel_vocoder (recipes/stage7_hift.yaml's export), which copies it here")
    vocoder_meta = read_export_meta(vocoder, "mel_vocoder")
    check_decoder_vocoder(export, meta, vocoder, vocoder_meta)
    if vocoder_meta.get("generator", "hift") != "hift":
        raise ValueError(f"{vocoder / CONFIG_FILE}: field 'generator' is {vocoder_meta['generator']!r}; the "
                         f"glm-4-voice-decoder layout holds a HiFT (hift.pt): train the flow with a HiFT mel vocoder "
                         f"(recipes/stage7_hift.yaml) to release it")
    hift, _ = load_mel_vocoder(vocoder, fold_weight_norm=False)  # written as weight_g / weight_v, as released
    try:
        text = released_config_yaml(flow.config, hift.config)
    except ValueError as e:
        raise ValueError(f"{Path(export) / CONFIG_FILE}: {e}") from None
    with staged_dir(out) as tmp:
        (tmp / "config.yaml").write_text(text, encoding="utf-8")
        torch.save(flow_state_to_released(flow), tmp / "flow.pt")
        torch.save(hift_state_to_released(hift), tmp / "hift.pt")
    return Path(out)


def release(export: str | Path, out: str | Path, fmt: str | None = None) -> Path:
    """Write the export ``export`` into ``out`` in a released layout. An LM export: ``fmt`` (one of
    ``LM_FORMATS``), by default the layout its weights came from (the ``weights_source`` it records). A stage-1
    export: GLM-4-Voice's speech-tokenizer layout. Atomic: ``out`` appears whole or not at all."""
    from lit_keomni.layouts import LM_FORMATS, save_lm_folder
    from lit_keomni.lm import LM_EXPORT_KINDS
    from lit_keomni.text.tokenizer import TextTokenizer

    cfg = Path(export) / CONFIG_FILE
    kind = export_kind(export, expected="expected an LM export (stage 2, 3 or 4, discrete mode), a stage-1 export or "
                                        "a flow_decoder export")
    if kind == "flow_decoder":
        if fmt not in (None, DECODER_FORMAT):
            raise ValueError(f"release: a flow_decoder export goes out as {DECODER_FORMAT!r}, not {fmt!r}")
        return release_glm4voice_decoder(export, out)
    if kind == "speech_tokenizer":
        if fmt not in (None, SPEECH_TOKENIZER_FORMAT):
            raise ValueError(f"release: a stage-1 export goes out as {SPEECH_TOKENIZER_FORMAT!r}, not {fmt!r}")
        return release_speech_tokenizer(export, out)
    if kind not in LM_EXPORT_KINDS:
        raise ValueError(f"{cfg}: field 'kind' is {kind!r}, expected one of {LM_EXPORT_KINDS}, 'speech_tokenizer' or "
                         f"'flow_decoder'")
    exp = load_export(export, kind)
    source = exp.meta.get("weights_source") or {}
    fmt = fmt or source.get("format")
    if fmt is None:
        raise ValueError(f"{cfg}: field 'weights_source' missing (the LM did not start from a released folder); "
                         f"name the layout, one of {LM_FORMATS}")
    if fmt not in LM_FORMATS:
        raise ValueError(f"release: format must be one of {LM_FORMATS}, got {fmt!r}")
    config = TransformerConfig.from_dict(exp.config, source=str(cfg))
    tokenizer = TextTokenizer.from_file(exp.path / "tokenizer.json")
    with staged_dir(out) as tmp:
        save_lm_folder(exp.state_dict, config, tmp, fmt, vocab_size=tokenizer.vocab_size)
        tokenizer.save_released(tmp)
        origin = Path(source["folder"]) if source.get("format") == fmt and source.get("folder") else None
        if origin is not None and origin.is_dir():  # the remote code the layout's config.json names (auto_map)
            for f in [*origin.glob("*.py"), *(origin / n for n in CARRIED_FILES)]:
                if f.is_file() and not (tmp / f.name).exists():
                    shutil.copy2(f, tmp / f.name)
    return Path(out)
