"""Released-model layouts: one weight map per layout, both ways.

A released checkpoint folder (Hugging Face ``config.json`` + safetensors, or the ChatGLM remote-code layout) enters
through the map of its layout and becomes our ``Transformer`` / ``SpeechTokenizerModel`` weights; an export goes back to
the layout it came from, so the reference code, transformers, vLLM or SGLang load it again.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file
from torch import Tensor

from lit_keomni.configs import TransformerConfig
from lit_keomni.layouts import chatglm, hf_lm

LM_FORMATS = ("llama", "qwen2", "glm", "glm4", "chatglm")
"""Released LM layouts: transformers' Llama, Qwen2, Glm, Glm4 classes and THUDM's ChatGLM remote code (GLM-4-9B,
glm-4-voice-9b)."""

_BY_ARCHITECTURE = {**{a: f for f, a in hf_lm.ARCHITECTURES.items()},
                    **{a: "chatglm" for a in chatglm.ARCHITECTURES}}


def _config_json(folder: str | Path) -> tuple[Path, dict]:
    from lit_keomni.checkpoints import read_config_json

    return Path(folder) / "config.json", read_config_json(folder)


def lm_format(folder: str | Path) -> str:
    """The layout (one of ``LM_FORMATS``) of a released LM folder, from config.json's ``model_type`` (or, without
    one, its ``architectures``); any other architecture raises naming config.json and the field."""
    cfg, hf = _config_json(folder)
    if "kind" in hf:
        raise ValueError(f"{cfg}: field 'kind' is {hf['kind']!r}: an export folder of ours, not a released LM")
    model_type = hf.get("model_type")
    if model_type is not None:
        if model_type not in LM_FORMATS:
            raise ValueError(f"{cfg}: field 'model_type' is {model_type!r}; a released LM must be one of {LM_FORMATS}")
        return model_type
    known = [_BY_ARCHITECTURE[a] for a in hf.get("architectures") or [] if a in _BY_ARCHITECTURE]
    if not known:
        raise ValueError(f"{cfg}: field 'model_type' missing and field 'architectures' is "
                         f"{hf.get('architectures')!r}; expected one of {sorted(_BY_ARCHITECTURE)}")
    return known[0]


def load_lm_folder(folder: str | Path) -> tuple[TransformerConfig, dict[str, Tensor], str]:
    """A released LM folder -> (our config, weights in our names with vocab rows zero-padded, its format)."""
    from lit_keomni.checkpoints import read_hf_folder

    fmt = lm_format(folder)
    cfg = str(Path(folder) / "config.json")
    hf, state = read_hf_folder(folder)
    weights = str(Path(folder) / "model.safetensors")
    if fmt == "chatglm":
        config = chatglm.config_from_chatglm(hf, source=cfg)
        return config, chatglm.from_chatglm(state, config, source=weights), fmt
    config = hf_lm.transformer_config_from_hf(hf, source=cfg)
    return config, hf_lm.from_hf(state, config, fmt, source=weights), fmt


def save_lm_folder(state: dict[str, Tensor], config: TransformerConfig, folder: str | Path, fmt: str, *,
                   vocab_size: int | None = None) -> Path:
    """Write our ``Transformer`` weights ``state`` into ``folder`` as ``fmt`` (config.json + model.safetensors) that
    transformers (or, for chatglm, THUDM's remote code that config.json's ``auto_map`` names) loads.

    ``vocab_size`` is the number of tokens of the vocabulary shipped with the weights. Every layout here records only
    the row count (transformers' ``vocab_size``, ChatGLM's ``padded_vocab_size``), which is ``config.vocab_size``; a
    vocabulary larger than that would give ids without rows and raises."""
    if fmt not in LM_FORMATS:
        raise ValueError(f"save_lm_folder: format must be one of {LM_FORMATS}, got {fmt!r}")
    out = Path(folder)
    rows = config.padded_vocab_size if fmt == "chatglm" else config.vocab_size
    if vocab_size is not None and vocab_size > rows:
        raise ValueError(f"{out / 'config.json'}: the vocabulary has {vocab_size} tokens but TransformerConfig field "
                         f"'vocab_size' gives only {rows} rows")
    source = f"save_lm_folder({out}, {fmt!r})"
    dtype = next(iter(state.values())).dtype
    if fmt == "chatglm":
        theirs, hf = chatglm.to_chatglm(state, config, source=source), chatglm.chatglm_config_json(config, dtype)
    else:
        theirs, hf = hf_lm.to_hf(state, config, fmt, source=source), hf_lm.hf_config_json(config, fmt, dtype)
    return write_released_folder(out, theirs, hf)


def write_released_folder(folder: str | Path, state: dict[str, Tensor], config_json: dict) -> Path:
    """``folder/model.safetensors`` and ``folder/config.json`` of a released layout (weights already in its names)."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    # contiguous copies: q/k row permutations and vocab trims are views that safetensors would refuse
    save_file({k: v.detach().to("cpu").contiguous() for k, v in state.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config_json, indent=2) + "\n", encoding="utf-8")
    return out


__all__ = ["LM_FORMATS", "lm_format", "load_lm_folder", "save_lm_folder", "write_released_folder"]
