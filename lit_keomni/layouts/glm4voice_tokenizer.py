"""GLM-4-Voice's released speech tokenizer (``glm-4-voice-tokenizer``: ``WhisperVQForConditionalGeneration``) <->
our stage-1 ``SpeechTokenizerModel``.

The reference is THUDM/GLM-4-Voice ``speech_tokenizer/`` (golden files in tests/golden/glm4voice_tokenizer/, made by
it with tests/golden/make_glm4voice_tokenizer.py). Its encoder is Whisper's with:

- causal convolutions (``encoder_causal_convolution``: two frames of left padding, as our ``causal_conv``);
- block-causal attention over ``quantize_causal_block_size`` 50 Hz frames (``block_seconds`` = size / 50), the keys
  of padding masked; the same mask at the token rate above the bottleneck;
- after layer ``pooling_position``, ``AvgPool1d(pooling_kernel_size)`` over every frame of a window, padding included
  (``pool_mode: window``), then the VQ at ``quantize_position`` (the same layer): the nearest of
  ``quantize_vocab_size`` codes by euclidean distance, no normalisation; the codebook is EMA-trained
  (``ema_count``/``ema_weight``, our ``cluster_size``/``embed_sum``);
- a second position table ``embed_positions2`` added to the quantised states (``post_vq_positions``), then the
  remaining layers, the final norm and Whisper's decoder (ASR), whose output is tied to its embedding.
Features: ``WhisperFeatureExtractor`` on audio zero-padded to a multiple of one token's samples
(``feature_pad_multiple``), 30 s windows tokenized on their own; our CTC head has no counterpart and starts random.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from lit_keomni.audio import SAMPLE_RATE
from lit_keomni.configs import SpeechTokenizerConfig

ARCHITECTURES = ("WhisperVQForConditionalGeneration",)
HOP = 160

_WHISPER = {  # WhisperConfig field -> SpeechTokenizerConfig field
    "num_mel_bins": "n_mels", "d_model": "d_model", "encoder_attention_heads": "n_head",
    "encoder_ffn_dim": "ffn_dim", "encoder_layers": "encoder_layers", "decoder_layers": "decoder_layers",
    "vocab_size": "vocab_size", "max_source_positions": "max_source_positions",
    "max_target_positions": "max_target_positions",
}
_FIXED = {  # reference options our network has one value of
    "activation_function": "gelu", "scale_embedding": False, "pooling_type": "avg",
    "encoder_causal_attention": False, "quantize_causal_encoder": False,
}
_RENAMED = {  # our name <-> the released name, besides the plain ``model.`` prefix
    "encoder.quantizer.codebook": "model.encoder.codebook.weight",
    "encoder.quantizer.cluster_size": "model.encoder.ema_count",
    "encoder.quantizer.embed_sum": "model.encoder.ema_weight",
    "encoder.post_vq_positions.weight": "model.encoder.embed_positions2.weight",
}


def is_released_tokenizer(hf: Mapping[str, Any]) -> bool:
    """True for a ``config.json`` of GLM-4-Voice's ``WhisperVQConfig`` (its pooling / quantize fields)."""
    return hf.get("quantize_vocab_size") is not None or any(a in ARCHITECTURES for a in hf.get("architectures") or [])


def config_from_released(hf: Mapping[str, Any], *, source: str = "config.json") -> SpeechTokenizerConfig:
    """A released ``config.json`` -> ``SpeechTokenizerConfig``; an option our network does not have raises naming
    the field."""
    for field in ("d_model", "encoder_layers", "encoder_attention_heads", "encoder_ffn_dim", "num_mel_bins",
                  "quantize_vocab_size", "quantize_position"):
        if hf.get(field) is None:
            raise ValueError(f"{source}: field '{field}' missing; not a GLM-4-Voice speech tokenizer config")
    for field, want in _FIXED.items():
        if hf.get(field, want) != want:
            raise ValueError(f"{source}: field '{field}' is {hf[field]!r}; only {want!r} is supported")
    if hf.get("decoder_attention_heads", hf["encoder_attention_heads"]) != hf["encoder_attention_heads"] or \
            hf.get("decoder_ffn_dim", hf["encoder_ffn_dim"]) != hf["encoder_ffn_dim"]:
        raise ValueError(f"{source}: fields 'decoder_attention_heads'/'decoder_ffn_dim' differ from the encoder's; "
                         f"our decoder has the encoder's width")
    pool = hf.get("pooling_kernel_size") or 1
    position = hf["quantize_position"]
    if pool > 1 and hf.get("pooling_position", position) != position:
        raise ValueError(f"{source}: field 'pooling_position' is {hf['pooling_position']}, but 'quantize_position' is "
                         f"{position}; pooling must sit at the VQ")
    block = hf.get("quantize_causal_block_size")
    values = {ours: hf[theirs] for theirs, ours in _WHISPER.items() if theirs in hf}
    values.update(
        vq_position=position, pool=pool, codebook_size=hf["quantize_vocab_size"], vq=True,
        causal_conv=bool(hf.get("encoder_causal_convolution", False)),
        block_seconds=None if block is None else block / 50,
        commitment=float(hf.get("quantize_loss_scale", 1.0)) * float(hf.get("quantize_commit_coefficient", 0.25)),
        vq_decay=float(hf.get("quantize_ema_decay") or 0.99), pool_mode="window", post_vq_positions=True,
        feature_pad_multiple=2 * pool * HOP, dropout=float(hf.get("dropout", 0.0)),
    )
    try:
        return SpeechTokenizerConfig(**values)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None


def released_config_json(config: SpeechTokenizerConfig, dtype: torch.dtype) -> dict[str, Any]:
    """The ``config.json`` ``WhisperVQConfig`` reads for ``config`` (the stage-1 export of a released tokenizer)."""
    c = config
    if c.pool_mode != "window" or not c.post_vq_positions or not c.vq:
        raise ValueError("released_config_json: SpeechTokenizerConfig fields 'pool_mode', 'post_vq_positions', 'vq' "
                         f"are {c.pool_mode!r}, {c.post_vq_positions}, {c.vq}; the released layout needs 'window', "
                         "True, True")
    return {
        "architectures": list(ARCHITECTURES), "model_type": "whisper", "num_mel_bins": c.n_mels,
        "d_model": c.d_model, "encoder_layers": c.encoder_layers, "decoder_layers": c.decoder_layers,
        "encoder_attention_heads": c.n_head, "decoder_attention_heads": c.n_head, "encoder_ffn_dim": c.ffn_dim,
        "decoder_ffn_dim": c.ffn_dim, "vocab_size": c.vocab_size, "max_source_positions": c.max_source_positions,
        "max_target_positions": c.max_target_positions, "activation_function": "gelu", "scale_embedding": False,
        "dropout": c.dropout, "tie_word_embeddings": True,
        "pooling_kernel_size": c.pool if c.pool > 1 else None, "pooling_type": "avg",
        "pooling_position": c.vq_position, "quantize_vocab_size": c.codebook_size,
        "quantize_position": c.vq_position, "quantize_commit_coefficient": 0.25,
        "quantize_loss_scale": c.commitment / 0.25, "quantize_ema_decay": c.vq_decay,
        "quantize_causal_block_size": None if c.block_frames is None else c.block_frames,
        "quantize_causal_encoder": False, "encoder_causal_attention": False,
        "encoder_causal_convolution": c.causal_conv, "quantize_encoder_only": False,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def from_released(state: Mapping[str, Tensor], config: SpeechTokenizerConfig, *,
                  source: str = "model.safetensors") -> dict[str, Tensor]:
    """Released weights -> ours (``proj_out`` is the tied decoder embedding; without ``ema_*`` the EMA starts at
    one assignment per code, as the reference initialises it). Names and shapes are checked against ``config``."""
    from lit_keomni.nn.whisper import SpeechTokenizerModel

    theirs = dict(state)
    theirs.pop("proj_out.weight", None)
    codebook = theirs.get(_RENAMED["encoder.quantizer.codebook"])
    if codebook is not None:
        theirs.setdefault(_RENAMED["encoder.quantizer.cluster_size"], torch.ones(codebook.shape[0]))
        theirs.setdefault(_RENAMED["encoder.quantizer.embed_sum"], codebook.float().clone())
    back = {v: k for k, v in _RENAMED.items()}
    ours = {back.get(k, k.removeprefix("model.")): v for k, v in theirs.items()}
    with torch.device("meta"):
        own = SpeechTokenizerModel(config).state_dict()
    for k, v in own.items():
        if k.startswith("ctc_head.") or k == "encoder.quantizer.initialized":
            continue
        if k not in ours:
            raise ValueError(f"{source}: weight '{_RENAMED.get(k, 'model.' + k)}' missing (config.json implies it, "
                             f"shape {list(v.shape)})")
        if tuple(ours[k].shape) != tuple(v.shape):
            raise ValueError(f"{source}: weight '{_RENAMED.get(k, 'model.' + k)}' has shape {list(ours[k].shape)}, "
                             f"config.json implies {list(v.shape)}")
    extra = sorted(set(ours) - set(own))
    if extra:
        raise ValueError(f"{source}: weight '{_RENAMED.get(extra[0], 'model.' + extra[0])}' has no counterpart in "
                         f"our speech tokenizer ({len(extra)} such)")
    ours["encoder.quantizer.initialized"] = torch.tensor(True)
    for k in ("encoder.quantizer.cluster_size", "encoder.quantizer.embed_sum"):
        ours[k] = ours[k].float()
    return ours


def to_released(state: Mapping[str, Tensor], config: SpeechTokenizerConfig) -> dict[str, Tensor]:
    """Our weights -> the released names (the CTC head dropped; ``proj_out`` left out: it is the tied decoder
    embedding, which the reference's ``save_pretrained`` does not write either). ``released_config_json`` first
    says whether ``config`` fits the layout."""
    out = {}
    for k, v in state.items():
        if k.startswith("ctc_head.") or k == "encoder.quantizer.initialized":
            continue
        out[_RENAMED.get(k, "model." + k)] = v
    return out


def feature_extractor_json(config: SpeechTokenizerConfig) -> dict[str, Any]:
    """``preprocessor_config.json`` of the ``WhisperFeatureExtractor`` the reference tokenizes with."""
    chunk = config.max_source_positions * 2 * HOP // SAMPLE_RATE
    return {"chunk_length": chunk, "feature_extractor_type": "WhisperFeatureExtractor",
            "feature_size": config.n_mels, "hop_length": HOP, "n_fft": 400, "n_samples": chunk * SAMPLE_RATE,
            "nb_max_frames": chunk * SAMPLE_RATE // HOP, "padding_side": "right", "padding_value": 0.0,
            "processor_class": "WhisperProcessor", "return_attention_mask": False, "sampling_rate": SAMPLE_RATE}


def check_feature_extractor(fe: Mapping[str, Any], config: SpeechTokenizerConfig, source: str) -> None:
    """The released ``preprocessor_config.json`` must describe the features our front end computes."""
    want = {"feature_size": config.n_mels, "hop_length": HOP, "n_fft": 400, "sampling_rate": SAMPLE_RATE,
            "padding_value": 0.0}
    for field, value in want.items():
        if field in fe and fe[field] != value:
            raise ValueError(f"{source}: field '{field}' is {fe[field]!r}; the tokenizer's front end needs {value!r}")
