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

import shutil
from pathlib import Path
from typing import Any

from lit_keomni.atomic import staged_dir
from lit_keomni.checkpoints import (CONFIG_FILE, export_kind, load_export, lm_tokenizer, read_export_meta,
                                    read_vocabulary, write_export)
from lit_keomni.configs import TransformerConfig, config_dict

VOCABULARY_FILES = ("tokenizer.json", "tokenizer.model")
"""The files that make a released folder's vocabulary: Hugging Face ``tokenizers`` JSON, or GLM-4's tiktoken ranks."""
CARRIED_FILES = ("generation_config.json", "special_tokens_map.json")
"""Files of the source folder a release carries over unchanged (beside its ``*.py`` remote code)."""
IMPORT_STAGES = ("pretrain", "sft")


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
    from lit_keomni.layouts import load_lm_folder
    from lit_keomni.lm import build_lm

    if stage not in IMPORT_STAGES:
        raise ValueError(f"import lm: stage must be one of {IMPORT_STAGES}, got {stage!r}")
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


def release(export: str | Path, out: str | Path, fmt: str | None = None) -> Path:
    """Write the LM export ``export`` into ``out`` in a released layout: ``fmt`` (one of ``LM_FORMATS``), by default
    the layout its weights came from (the ``weights_source`` it records). Atomic: ``out`` appears whole or not at
    all."""
    from lit_keomni.layouts import LM_FORMATS, save_lm_folder
    from lit_keomni.lm import LM_EXPORT_KINDS
    from lit_keomni.text.tokenizer import TextTokenizer

    cfg = Path(export) / CONFIG_FILE
    kind = export_kind(export, expected="expected an LM export (stage 2, 3 or 4, discrete mode)")
    if kind not in LM_EXPORT_KINDS:
        raise ValueError(f"{cfg}: field 'kind' is {kind!r}, expected one of {LM_EXPORT_KINDS}")
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
