"""The single door between stages: handoff folders, Hugging Face weight maps, atomic checkpoint files.

An export folder holds ``config.json`` (kind, version, sizes), ``model.safetensors`` and, where relevant, the text
tokenizer. The next stage names the folder in its recipe (``model.init_from: checkpoints/stage1/export``) and
``load_export`` checks the kind and every size it depends on, saying which file and field mismatch. Folders are written
under a temporary name and renamed, so a crash never leaves a half export that a later stage would load.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from safetensors.torch import load_file, save_file

from lit_keomni.atomic import staged_dir, staged_file, write_json
from lit_keomni.audio import SAMPLE_RATE
from torch import Tensor

EXPORT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


@dataclass
class LoadedExport:
    """A loaded handoff folder: its metadata and its weights (on CPU)."""

    path: Path
    meta: dict[str, Any]
    state_dict: dict[str, Tensor]

    @property
    def config(self) -> dict[str, Any]:
        return self.meta["config"]


def write_export(
    out_dir: str | Path,
    *,
    kind: str,
    config: Mapping[str, Any],
    state_dict: Mapping[str, Tensor],
    extra: Mapping[str, Any] | None = None,
    files: Mapping[str, Callable[[Path], Any]] | None = None,
) -> Path:
    """Write ``out_dir`` atomically: everything goes to a sibling temp folder that replaces ``out_dir`` at the end.

    ``files`` maps a description to a writer called with the temp folder (e.g. the tokenizer's ``save``).
    """
    out = Path(out_dir)
    with staged_dir(out) as tmp:
        tensors, seen = {}, set()
        for k, v in state_dict.items():  # tied weights share storage, which safetensors refuses: copy the second
            t = v.detach().to("cpu").contiguous()
            tensors[k] = t.clone() if t.data_ptr() in seen else t
            seen.add(t.data_ptr())
        save_file(tensors, str(tmp / WEIGHTS_FILE))
        write_json(tmp / CONFIG_FILE, {"kind": kind, "version": EXPORT_VERSION, "config": dict(config), **dict(extra or {})})
        for write in (files or {}).values():
            write(tmp)
    return out


def _read_config(cfg: Path, missing: str, damaged: str) -> Any:
    """``config.json`` parsed, or one error naming the file: ``missing`` / ``damaged`` complete the message."""
    if not cfg.is_file():
        raise FileNotFoundError(f"{cfg}: missing; {missing}")
    try:
        return json.loads(cfg.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{cfg}: {damaged} ({e})") from None


def export_kind(path: str | Path, *, expected: str = "expected an export folder") -> str | None:
    """The ``kind`` in ``path/config.json``: one of our export kinds, or None for a folder whose config has none (a
    Hugging Face model folder). ``expected`` completes the error when ``config.json`` is missing."""
    meta = _read_config(Path(path) / CONFIG_FILE, expected, "not valid JSON")
    kind = meta.get("kind") if isinstance(meta, dict) else None
    return None if kind is None else str(kind)


def read_config_json(path: str | Path) -> dict[str, Any]:
    """``path/config.json`` of a model folder, parsed; one error naming the file when missing or damaged."""
    meta = _read_config(Path(path) / CONFIG_FILE, "expected a model folder", "not valid JSON")
    if not isinstance(meta, dict):
        raise ValueError(f"{Path(path) / CONFIG_FILE}: not a JSON object")
    return meta


def read_export_meta(path: str | Path, kind: str) -> dict[str, Any]:
    """Read and check ``config.json`` of an export folder (kind and version), with errors naming the file and field."""
    folder = Path(path)
    cfg = folder / CONFIG_FILE
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: export folder not found (expected a folder written by a '{kind}' stage)")
    meta = _read_config(cfg, f"{folder} is not an export folder", "damaged export config")
    for field in ("kind", "version", "config"):
        if field not in meta:
            raise ValueError(f"{cfg}: field '{field}' missing")
    if meta["kind"] != kind:
        raise ValueError(f"{cfg}: field 'kind' is {meta['kind']!r}, expected {kind!r}")
    if meta["version"] != EXPORT_VERSION:
        raise ValueError(f"{cfg}: field 'version' is {meta['version']}, this lit-keomni reads version {EXPORT_VERSION}")
    return meta


def load_export(path: str | Path, kind: str, expect: Mapping[str, Any] | None = None) -> LoadedExport:
    """Load an export of ``kind``; ``expect`` maps meta fields (top level or in ``config``) to required values."""
    folder = Path(path)
    meta = read_export_meta(folder, kind)
    for field, want in (expect or {}).items():
        found = meta.get(field, meta["config"].get(field))
        if found != want:
            raise ValueError(f"{folder / CONFIG_FILE}: field '{field}' is {found!r}, expected {want!r}")
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: missing from export folder {folder}")
    try:
        state = load_file(str(weights))
    except Exception as e:  # safetensors raises its own error types for truncated/damaged files
        raise ValueError(f"{weights}: damaged weights file ({e})") from None
    from lit_keomni.nn.lora import LORA_FILE, LoRAConfig, merge_lora_state

    adapters = folder / LORA_FILE
    if adapters.is_file():  # an LM trained with LoRA, exported unmerged (merge_lora: false): merged here

        if "lora" not in meta:
            raise ValueError(f"{folder / CONFIG_FILE}: field 'lora' missing, but {adapters} holds LoRA weights")
        try:
            lora = load_file(str(adapters))
        except Exception as e:
            raise ValueError(f"{adapters}: damaged weights file ({e})") from None
        state = merge_lora_state({**state, **lora}, LoRAConfig.from_dict(meta["lora"], str(folder / CONFIG_FILE)))
    return LoadedExport(folder, meta, state)


def load_state_checked(module: torch.nn.Module, state: Mapping[str, Tensor], source: str, *, allow_missing: tuple[str, ...] = ()) -> None:
    """``load_state_dict`` with one clear error listing missing/unexpected keys and shape mismatches."""
    own = module.state_dict()
    problems = []
    missing = [k for k in own if k not in state and not k.startswith(allow_missing)]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: {tuple(state[k].shape)} in file, {tuple(v.shape)} in model" for k, v in own.items()
              if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing:
        problems.append(f"missing {missing[:8]}{' …' if len(missing) > 8 else ''}")
    if unexpected:
        problems.append(f"unexpected {unexpected[:8]}{' …' if len(unexpected) > 8 else ''}")
    if shapes:
        problems.append("shape mismatch " + "; ".join(shapes[:8]))
    if problems:
        raise ValueError(f"{source}: weights do not fit the model: " + " | ".join(problems))
    module.load_state_dict(state, strict=False)


# ---------------------------------------------------------------------------------------------------- Hugging Face


def read_hf_folder(path: str | Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """config.json and all safetensors weights (single file or sharded with an index) of a local HF model folder."""
    folder = Path(path)
    cfg = folder / "config.json"
    if not cfg.is_file():
        raise FileNotFoundError(f"{cfg}: missing; init_from must be a local Hugging Face model folder")
    config = json.loads(cfg.read_text(encoding="utf-8"))
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (folder / WEIGHTS_FILE).is_file():
        shards = [WEIGHTS_FILE]
    else:
        raise FileNotFoundError(f"{folder}: no model.safetensors or model.safetensors.index.json (only safetensors are read)")
    state: dict[str, Tensor] = {}
    for shard in shards:
        state.update(load_file(str(folder / shard)))
    return config, state


WHISPER_CONFIG_MAP = {
    "d_model": "d_model",
    "encoder_attention_heads": "n_head",
    "encoder_ffn_dim": "ffn_dim",
    "encoder_layers": "encoder_layers",
    "decoder_layers": "decoder_layers",
    "num_mel_bins": "n_mels",
    "vocab_size": "vocab_size",
    "max_source_positions": "max_source_positions",
    "max_target_positions": "max_target_positions",
}
"""Hugging Face ``WhisperConfig`` field -> our ``SpeechTokenizerConfig`` field."""


def whisper_from_hf(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """HF ``WhisperModel``/``WhisperForConditionalGeneration`` weights -> ours (our names follow HF's)."""
    out = {}
    for k, v in state.items():
        k = k.removeprefix("model.")
        if k == "proj_out.weight":  # tied to decoder.embed_tokens
            continue
        out[k] = v
    return out


def whisper_to_hf(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Ours -> HF ``WhisperModel`` names (dropping the VQ and CTC head, which Whisper has not)."""
    return {k: v for k, v in state.items() if not k.startswith(("encoder.quantizer.", "ctc_head."))}


def check_hf_whisper_config(hf: Mapping[str, Any], ours: Mapping[str, Any], source: str) -> None:
    for hf_field, our_field in WHISPER_CONFIG_MAP.items():
        if hf_field in hf and hf[hf_field] != ours.get(our_field):
            raise ValueError(f"{source}: field '{hf_field}' is {hf[hf_field]}, but model.config.{our_field} is {ours.get(our_field)}")


# ---------------------------------------------------------------------------------------------------- Lightning


class CheckpointLoadError(ValueError):
    """A checkpoint file is missing, truncated or damaged; the message names the file."""

    @classmethod
    def unreadable(cls, path: Any, error: BaseException) -> "CheckpointLoadError":
        size = f"{Path(path).stat().st_size} bytes" if Path(path).is_file() else "missing"
        cause = str(error).strip().splitlines()[0].rstrip(".") if str(error).strip() else type(error).__name__
        return cls(f"{path}: cannot load this checkpoint ({size}), it is probably truncated or damaged: {cause}. "
                   f"Resume from another checkpoint, or start without --ckpt_path.")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoints written to a temp file in the same folder, fsynced, then renamed over the target; a
    file that cannot be read back raises one `CheckpointLoadError` naming it (not torch's zip-reader traceback)."""

    def load_checkpoint(self, path: Any, map_location: Any = lambda storage, loc: storage,
                        weights_only: bool | None = None) -> dict[str, Any]:
        if "://" not in str(path) and not Path(path).is_file():
            raise CheckpointLoadError(f"{path}: checkpoint file not found")
        try:
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        except Exception as e:  # torch raises RuntimeError (zip reader), EOFError or UnpicklingError for bad files
            raise CheckpointLoadError.unreadable(path, e) from e

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        with staged_file(path, "wb") as f:
            torch.save(checkpoint, f)


class Export(L.Callback):
    """Writes the stage's handoff folder (``pl_module.export(dir)``) at the end of ``fit``. Every rank calls
    ``export`` (a sharded model is gathered collectively; the module writes on global rank 0 only), then all wait
    until the folder is complete."""

    def __init__(self, dirpath: str | None = None) -> None:
        """
        Args:
            dirpath: Export folder; None = the module's ``export_dir`` hyper-parameter.
        """
        self.dirpath = dirpath

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        target = self.dirpath or pl_module.hparams.get("export_dir")
        if target and not trainer.sanity_checking:
            path = pl_module.export(target)
            trainer.strategy.barrier("export")
            if trainer.is_global_zero:
                print(f"exported {type(pl_module).__name__} to {path}")


def load_speech_tokenizer(path: str | Path) -> tuple[Any, Any, dict[str, Any]]:
    """Stage-1 export -> (``SpeechTokenizerModel`` in eval mode, its ``TextTokenizer``, export metadata)."""
    from lit_keomni.configs import SpeechTokenizerConfig
    from lit_keomni.nn.whisper import SpeechTokenizerModel
    from lit_keomni.text.tokenizer import TextTokenizer

    exp = load_export(path, "speech_tokenizer")
    config = SpeechTokenizerConfig.from_dict(exp.config, source=str(exp.path / CONFIG_FILE))
    model = SpeechTokenizerModel(config)
    load_state_checked(model, exp.state_dict, str(exp.path / WEIGHTS_FILE))
    model.encoder.use_vq = bool(exp.meta.get("vq_active", config.vq))
    tokenizer = TextTokenizer.from_file(exp.path / "tokenizer.json")
    if tokenizer.vocab_size != config.vocab_size:
        raise ValueError(f"{exp.path / 'tokenizer.json'}: vocabulary of {tokenizer.vocab_size} tokens, but "
                         f"{exp.path / CONFIG_FILE} field 'vocab_size' is {config.vocab_size}")
    return model.eval(), tokenizer, exp.meta


def lm_tokenizer(speech_export: str | Path, vocabulary: str | Path | None = None) -> tuple[Any, dict[str, Any]]:
    """The vocabulary every LM stage uses, and the stage-1 export's metadata: the text tokenizer of the stage-1
    export, or ``vocabulary`` (a released LM's own: a folder with ``tokenizer.json`` or GLM-4's ``tokenizer.model``,
    or a ``tokenizer.json``), extended with the export's speech tokens and the dialogue specials. Speech tokens the
    vocabulary already holds (glm-4-voice-9b's ``<|audio_N|>``) are used as they are; a count that disagrees with the
    export's codebook is one error naming both."""
    meta = read_export_meta(speech_export, "speech_tokenizer")
    tokenizer = read_vocabulary(vocabulary or Path(speech_export) / "tokenizer.json")
    try:
        tokenizer.add_speech_tokens(int(meta["codebook_size"]))
    except ValueError as e:  # the vocabulary's own speech tokens disagree with the codebook: name both files
        raise ValueError(f"{e} ({Path(speech_export) / CONFIG_FILE} field 'codebook_size')") from None
    return tokenizer, meta


def read_vocabulary(path: str | Path) -> Any:
    """A ``TextTokenizer`` from a ``tokenizer.json`` file or a released model's folder (``tokenizer.json``, or
    GLM-4's tiktoken ``tokenizer.model`` with its ``tokenizer_config.json``)."""
    from lit_keomni.text.tokenizer import TextTokenizer

    path = Path(path)
    return TextTokenizer.from_folder(path) if path.is_dir() else TextTokenizer.from_file(path)


def load_lm(path: str | Path, kind: str = "speech_lm") -> tuple[Any, Any, dict[str, Any]]:
    """An LM export (stage 2 ``text_to_token``, stages 3-4 ``speech_lm``) -> (``Transformer`` in eval mode, its
    speech-extended ``TextTokenizer``, export metadata); tokenizer, codebook and vocabulary sizes are checked."""
    from lit_keomni.configs import TransformerConfig
    from lit_keomni.nn.transformer import Transformer
    from lit_keomni.text.tokenizer import TextTokenizer

    exp = load_export(path, kind)
    config = TransformerConfig.from_dict(exp.config, source=str(exp.path / CONFIG_FILE))
    tokenizer = TextTokenizer.from_file(exp.path / "tokenizer.json")
    codebook = exp.meta["speech_tokenizer"]["codebook_size"]
    if tokenizer.num_audio_tokens != codebook:
        raise ValueError(f"{exp.path / 'tokenizer.json'}: {tokenizer.num_audio_tokens} speech tokens, but "
                         f"{exp.path / CONFIG_FILE} field 'speech_tokenizer.codebook_size' is {codebook}")
    if tokenizer.vocab_size > config.vocab_size:  # fewer is a released LM's own rows (GLM-4 pads to 151,552)
        raise ValueError(f"{exp.path / 'tokenizer.json'}: vocabulary of {tokenizer.vocab_size} tokens, but "
                         f"{exp.path / CONFIG_FILE} field 'vocab_size' is {config.vocab_size}")
    model = Transformer(config)
    load_state_checked(model, exp.state_dict, str(exp.path / WEIGHTS_FILE))
    return model.eval(), tokenizer, exp.meta


def load_text_to_token(path: str | Path) -> tuple[Any, Any, dict[str, Any]]:
    """Stage-2 export -> (``Transformer`` in eval mode, its speech-extended ``TextTokenizer``, export metadata)."""
    return load_lm(path, "text_to_token")


def export_fingerprint(path: str | Path) -> str:
    """SHA-256 of an export's config and weights: data derived from an export records it, to notice a re-export."""
    import hashlib

    h = hashlib.sha256()
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        with open(Path(path) / name, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def load_keomni(path: str | Path, *, answers: bool = False,
                block_size: int | None = None) -> tuple[Any, Any, dict[str, Any]]:
    """A stage-4 KE-Omni export (kind ``keomni_lm``: speech encoder, adapter and LLM) -> (``KeOmni`` in eval mode,
    its ``TextTokenizer``, export metadata); the three configs and the tokenizer's vocabulary are checked.

    ``answers``: the caller needs a model that answers (chat, evaluation, the speech decoder's features), so an
    adapter-alignment export (``target: transcript``, which writes the user's words) is refused. ``block_size``:
    build the LLM with this context length instead of the export's."""
    from lit_keomni.nn.keomni import KeOmni
    from lit_keomni.text.tokenizer import TextTokenizer

    exp = load_export(path, "keomni_lm")
    if answers and exp.meta.get("target", "answer") != "answer":
        raise ValueError(f"{exp.path / CONFIG_FILE}: field 'target' is {exp.meta.get('target')!r}: an adapter-alignment "
                         "export writes down the user's words, it does not answer; give the SFT export "
                         "(recipes/stage4_keomni.yaml)")
    config = dict(exp.config)
    if block_size is not None and isinstance(config.get("llm"), dict):
        config["llm"] = {**config["llm"], "block_size": block_size}
    model = KeOmni.from_config(config, source=str(exp.path / CONFIG_FILE))
    tokenizer = TextTokenizer.from_file(exp.path / "tokenizer.json")
    if tokenizer.vocab_size != model.llm.config.vocab_size:
        raise ValueError(f"{exp.path / 'tokenizer.json'}: vocabulary of {tokenizer.vocab_size} tokens, but "
                         f"{exp.path / CONFIG_FILE} field 'config.llm.vocab_size' is {model.llm.config.vocab_size}")
    load_state_checked(model, exp.state_dict, str(exp.path / WEIGHTS_FILE))
    return model.eval(), tokenizer, exp.meta


UNIT_SOURCE_KINDS = ("speech_tokenizer", "units")


def unit_meta(path: str | Path) -> dict[str, Any]:
    """What a unit source gives stages 5–7: ``num_units``, ``frame_rate`` (Hz), ``sample_rate`` of the audio it reads,
    ``kind`` and ``fingerprint``.

    A unit source is the stage-1 export (units are its VQ codes, the default) or a ``units`` export written by
    ``python -m lit_keomni units`` (HuBERT k-means ids).
    """
    kind = export_kind(path, expected=f"expected one of the unit sources {UNIT_SOURCE_KINDS}")
    if kind not in UNIT_SOURCE_KINDS:
        raise ValueError(f"{Path(path) / CONFIG_FILE}: field 'kind' is {kind!r}, expected one of {UNIT_SOURCE_KINDS}")
    meta = read_export_meta(path, kind)
    if kind == "speech_tokenizer":
        num_units, rate = meta["codebook_size"], meta["frame_rate_hz"]
    else:
        num_units, rate = meta["config"]["num_units"], meta["config"]["frame_rate"]
    return {"kind": kind, "num_units": int(num_units), "frame_rate": float(rate),
            "sample_rate": int(meta.get("sample_rate", SAMPLE_RATE)), "fingerprint": export_fingerprint(path)}


# ---------------------------------------------------------------------------------------------------- speech decoder

DECODER_FIELDS = ("hidden_size", "llm_fingerprint", "num_units", "frame_rate", "units_fingerprint")
"""Fields of a duration / unit_generator export's config.json that its users check (chat, stage 6)."""


def decoder_handoff(llm_from: str | Path, units_from: str | Path) -> dict[str, Any]:
    """What a speech-decoder export records of its inputs: the stage-4 KE-Omni export (``hidden_size``,
    ``llm_fingerprint``) and the unit source (``num_units``, ``frame_rate``, ``units_fingerprint``, ``units_kind``)."""
    llm = read_export_meta(llm_from, "keomni_lm")
    units = unit_meta(units_from)
    return {"hidden_size": int(llm["config"]["llm"]["n_embd"]), "llm_fingerprint": export_fingerprint(llm_from),
            "llm_from": str(Path(llm_from).resolve()), "num_units": units["num_units"],
            "frame_rate": units["frame_rate"], "units_fingerprint": units["fingerprint"], "units_kind": units["kind"],
            "units_from": str(Path(units_from).resolve())}


def _load_decoder(path: str | Path, kind: str, expect: Mapping[str, Any] | None) -> tuple[LoadedExport, Any]:
    from lit_keomni.configs import TransformerConfig

    exp = load_export(path, kind, expect)
    for field in DECODER_FIELDS:
        if field not in exp.meta:
            raise ValueError(f"{exp.path / CONFIG_FILE}: field '{field}' missing")
    return exp, TransformerConfig.from_dict(exp.config, source=str(exp.path / CONFIG_FILE))


def load_duration(path: str | Path, expect: Mapping[str, Any] | None = None) -> tuple[Any, dict[str, Any]]:
    """A stage-5 export (kind ``duration``) -> (``DurationPredictor`` in eval mode, export metadata). ``expect``:
    required values of metadata fields, e.g. ``{"hidden_size": 4096, "llm_fingerprint": ...}``."""
    from lit_keomni.nn.speech_decoder import DurationPredictor

    exp, config = _load_decoder(path, "duration", expect)
    model = DurationPredictor(int(exp.meta["hidden_size"]), config)
    load_state_checked(model, exp.state_dict, str(exp.path / WEIGHTS_FILE))
    return model.eval(), exp.meta


def load_unit_generator(path: str | Path, expect: Mapping[str, Any] | None = None) -> tuple[Any, dict[str, Any]]:
    """A stage-6 export (kind ``unit_generator``) -> (``UnitGenerator`` in eval mode, export metadata: speaker,
    num_units, frame_rate, fingerprints, hidden_size). ``expect`` as for ``load_duration``."""
    from lit_keomni.nn.speech_decoder import UnitGenerator

    exp, config = _load_decoder(path, "unit_generator", expect)
    model = UnitGenerator(int(exp.meta["hidden_size"]), int(exp.meta["num_units"]), config)
    load_state_checked(model, exp.state_dict, str(exp.path / WEIGHTS_FILE))
    return model.eval(), exp.meta


def load_vocoder(path: str | Path) -> tuple[Any, dict[str, Any]]:
    """A stage-7 export (kind ``vocoder``) -> (``UnitVocoder``, or ``UnitVocos`` for ``config.generator`` "vocos", in
    eval mode, weight norm folded in; export metadata). The generator config must agree with the recorded
    ``num_units``, ``sample_rate`` and ``frame_rate``."""
    from lit_keomni.nn.hifigan import VocoderConfig
    from lit_keomni.nn.vocos import unit_vocoder_class

    exp = load_export(path, "vocoder")
    source = str(exp.path / CONFIG_FILE)
    config = VocoderConfig.from_dict(exp.config, source=source)
    for field in ("sample_rate", "frame_rate"):
        if field not in exp.meta or exp.meta[field] != getattr(config, field):
            raise ValueError(f"{source}: field '{field}' is {exp.meta.get(field)!r}, but 'config.{field}' is "
                             f"{getattr(config, field)!r}")
    if "num_units" not in exp.meta:
        raise ValueError(f"{source}: field 'num_units' missing")
    model = unit_vocoder_class(config)(int(exp.meta["num_units"]), config)
    load_state_checked(model, exp.state_dict, str(exp.path / WEIGHTS_FILE))
    return model.remove_weight_norm().eval(), exp.meta


def load_mel_vocoder(path: str | Path, *, fold_weight_norm: bool = True) -> tuple[Any, dict[str, Any]]:
    """A stage-7 mel-vocoder export (kind ``mel_vocoder``) -> (``HiFTGenerator`` or ``VocosGenerator``, as its field
    ``generator`` says (absent = HiFT), in eval mode, weight norm folded in unless ``fold_weight_norm`` is False; export
    metadata: ``sample_rate``, ``n_mels``, ``hop`` and ``mel``, the settings of the mel it reads). The recorded sizes
    must agree with the generator config."""
    from lit_keomni.nn.vocos import mel_vocoder_classes

    exp = load_export(path, "mel_vocoder")
    source = str(exp.path / CONFIG_FILE)
    config_class, generator_class = mel_vocoder_classes(exp.meta.get("generator", "hift"), source)
    config = config_class.from_dict(exp.config, source=source)
    for field, value in (("sample_rate", config.sampling_rate), ("n_mels", config.in_channels), ("hop", config.hop)):
        if exp.meta.get(field) != value:
            raise ValueError(f"{source}: field '{field}' is {exp.meta.get(field)!r}, but the config gives {value!r}")
    model = generator_class(config)
    load_state_checked(model, exp.state_dict, str(exp.path / WEIGHTS_FILE))
    return (model.remove_weight_norm() if fold_weight_norm else model).eval(), exp.meta


def load_flow_decoder(path: str | Path, expect: Mapping[str, Any] | None = None) -> tuple[Any, dict[str, Any]]:
    """A GLM-4-Voice decoder export (kind ``flow_decoder``: recipes/stage7_flow.yaml, or ``import glm4voice-decoder``)
    -> (``FlowDecoder`` in eval mode, export metadata: ``codebook_size``, ``frame_rate_hz``, ``sample_rate``, ``hop``,
    ``n_mels``, ``mel`` and ``units_fingerprint`` of the speech tokens it decodes). The recorded sizes must agree with
    the flow config; ``expect`` as for ``load_export``."""
    from lit_keomni.nn.flow import FlowConfig, FlowDecoder

    exp = load_export(path, "flow_decoder", expect)
    source = str(exp.path / CONFIG_FILE)
    config = FlowConfig.from_dict(exp.config, source=source)
    for field, value in (("codebook_size", config.vocab_size), ("frame_rate_hz", config.frame_rate),
                         ("sample_rate", config.sample_rate), ("hop", config.hop_length), ("n_mels", config.n_mels)):
        if exp.meta.get(field) != value:
            raise ValueError(f"{source}: field '{field}' is {exp.meta.get(field)!r}, but the config gives {value!r}")
    model = FlowDecoder(config)
    load_state_checked(model, exp.state_dict, str(exp.path / WEIGHTS_FILE))
    return model.eval(), exp.meta
