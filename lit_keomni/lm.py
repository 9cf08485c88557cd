"""The language model every LM stage trains (text-to-token, pretrain, SFT): building it from a preset, a local
Hugging Face Llama folder or an earlier stage's export, and its masked next-token loss.

``init_from`` accepts
- ``None``: random initialisation of the preset (CPU recipes);
- a Hugging Face Llama-layout folder (``config.json`` + safetensors): a text LM whose embeddings are grown to the
  speech-extended vocabulary (new rows start at the mean of the old ones, GLM-4-Voice §2.3);
- an export folder of an LM stage (``config.json`` with ``kind``): its weights as they are (same vocabulary).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lit_keomni.checkpoints import CONFIG_FILE, WEIGHTS_FILE, export_kind, llama_from_hf, load_export, load_hf_llama, load_state_checked
from lit_keomni.configs import TransformerConfig
from lit_keomni.nn.transformer import Transformer

_INIT_FROM = "init_from must be a Hugging Face Llama folder or an LM export folder"
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
        if loaded.vocab_size != vocab_size:
            raise ValueError(f"{exp.path / CONFIG_FILE}: field 'vocab_size' is {loaded.vocab_size}, but this stage's "
                             f"tokenizer has {vocab_size} tokens (found vs expected)")
        model = Transformer(loaded.replace(**kept))
        load_state_checked(model, exp.state_dict, str(exp.path / WEIGHTS_FILE))
        return model
    hf_config, state = load_hf_llama(init_from)
    model = Transformer(hf_config.replace(**kept))
    model.load_state_dict(llama_from_hf(state, model.config, source=init_from))
    if vocab_size < model.config.vocab_size:
        raise ValueError(f"{init_from}: the LM has {model.config.vocab_size} tokens but the stage's tokenizer only "
                         f"{vocab_size}: give stage 1 the LM's tokenizer.json")
    model.resize_token_embeddings(vocab_size)
    return model


def masked_lm_loss(logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Cross-entropy over the trained positions (``target != -100``) and the top-1 accuracy there."""
    loss = F.cross_entropy(logits.float().flatten(0, 1), target.flatten(), ignore_index=-100)
    trained = target != -100
    with torch.no_grad():
        acc = (logits.argmax(-1)[trained] == target[trained]).float().mean() if trained.any() else logits.new_zeros(())
    return loss, acc


def flops_per_token(model: Transformer, context: int = 512) -> float:
    """Training FLOPs per token: 6 per parameter (forward + backward) plus attention over ``context`` tokens."""
    c = model.config
    n = sum(p.numel() for p in model.parameters())
    return 6 * n + 12 * c.n_layer * c.n_embd * min(c.block_size, context)


def lm_meta(model: Transformer) -> dict[str, Any]:
    return {"parameters": sum(p.numel() for p in model.parameters())}
