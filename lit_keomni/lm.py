"""The language model every LM stage trains (text-to-token, pretrain, SFT): building it from a preset, a local
released LM folder or an earlier stage's export, and its masked next-token loss.

``init_from`` accepts
- ``None``: random initialisation of the preset (CPU recipes);
- a released LM folder in one of ``layouts.LM_FORMATS`` (Llama, Qwen2, transformers' Glm/Glm4, THUDM's ChatGLM):
  its rows are kept when the stage's tokenizer has no more tokens (GLM-4 pads its vocabulary to 151,552 rows and
  glm-4-voice-9b already holds the 16,384 audio tokens), grown to the speech-extended vocabulary otherwise (new rows
  start at the mean of the old ones, GLM-4-Voice §2.3);
- an export folder of an LM stage (``config.json`` with ``kind``): its weights as they are; its rows may exceed the
  tokenizer (a released LM's rows passed on), never fall short of it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lit_keomni.checkpoints import CONFIG_FILE, WEIGHTS_FILE, export_kind, load_export, load_state_checked
from lit_keomni.configs import TransformerConfig
from lit_keomni.nn.transformer import Transformer

_INIT_FROM = "init_from must be a released LM folder (Llama, Qwen2, Glm, Glm4, ChatGLM) or an LM export folder"
LM_EXPORT_KINDS = ("text_to_token", "speech_lm")
"""Export kinds holding a ``Transformer`` + its speech-extended tokenizer."""


def is_export(folder: str | Path) -> bool:
    """True when ``folder/config.json`` is one of our export configs (it has a ``kind``), not a Hugging Face one."""
    return export_kind(folder, expected=_INIT_FROM) is not None


def build_lm(config: TransformerConfig, vocab_size: int, init_from: str | None = None, *,
             keep: tuple[str, ...] = ("block_size",)) -> Transformer:
    """The LM for a stage whose tokenizer has ``vocab_size`` tokens (see the module docstring for ``init_from``).

    ``keep`` names fields of ``config`` that override those of a loaded model (the recipe's sequence length).
    """
    if not init_from:
        return Transformer(config.replace(vocab_size=vocab_size))
    kept = {k: getattr(config, k) for k in keep}
    kind = export_kind(init_from, expected=_INIT_FROM)
    if kind is not None:
        if kind not in LM_EXPORT_KINDS:
            raise ValueError(f"{Path(init_from) / CONFIG_FILE}: field 'kind' is {kind!r}, expected one of {LM_EXPORT_KINDS}")
        exp = load_export(init_from, kind)
        loaded = TransformerConfig.from_dict(exp.config, source=str(exp.path / CONFIG_FILE))
        if loaded.vocab_size < vocab_size:
            raise ValueError(f"{exp.path / CONFIG_FILE}: field 'vocab_size' is {loaded.vocab_size}, but this stage's "
                             f"tokenizer has {vocab_size} tokens (found vs expected; rows for every token needed)")
        model = Transformer(loaded.replace(**kept))
        load_state_checked(model, exp.state_dict, str(exp.path / WEIGHTS_FILE))
        return model
    from lit_keomni.layouts import load_lm_folder

    released, state, _ = load_lm_folder(init_from)
    model = Transformer(released.replace(**kept))
    load_state_checked(model, state, str(Path(init_from) / WEIGHTS_FILE))
    if vocab_size > model.config.vocab_size:
        model.resize_token_embeddings(vocab_size)
    return model


def masked_lm_loss(losses: Tensor, predicted: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Mean cross-entropy over the trained positions (``target != -100``) and the top-1 accuracy there, from the
    per-token losses and predictions a ``Transformer`` gives with ``targets`` (plain or chunked)."""
    trained = target != -100
    loss = losses.sum() / trained.sum().clamp(min=1)
    with torch.no_grad():
        acc = (predicted[trained] == target[trained]).float().mean() if trained.any() else loss.new_zeros(())
    return loss, acc


def flops_per_token(model: Transformer, context: int = 512) -> float:
    """Training FLOPs per token: 6 per parameter (forward + backward) plus attention over ``context`` tokens."""
    c = model.config
    n = sum(p.numel() for p in model.parameters())
    return 6 * n + 12 * c.n_layer * c.n_embd * min(c.block_size, context)


def lm_meta(model: Transformer) -> dict[str, Any]:
    return {"parameters": sum(p.numel() for p in model.parameters())}
