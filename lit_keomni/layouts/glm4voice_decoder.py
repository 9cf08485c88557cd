"""GLM-4-Voice's released speech decoder (``glm-4-voice-decoder``: config.yaml, flow.pt, hift.pt) <-> our
``nn.flow.FlowDecoder``.

The reference is THUDM/GLM-4-Voice ``cosyvoice/`` with Matcha-TTS's estimator blocks (golden files in
tests/golden/glm4voice_flow/, made by it with tests/golden/make_glm4voice_flow.py):

- config.yaml is HyperPyYAML (``!new:module.Class`` builds an object, ``!apply:`` calls a function, ``!ref <key>``
  repeats another key). ``read_decoder_config`` reads it without building or calling anything: a ``!new:`` mapping
  becomes a dict with its class under ``_class``, ``!ref`` is resolved, ``!apply:`` is accepted only for the seed
  setters the released file starts with (kept as ``{"_apply": name, "_args": [...]}``), any other tag is an error.
- Released flow section: MaskedDiffWithXvec(input_size 512, output_size 80, spk_embed_dim 192, vocab_size 16384,
  input_frame_rate 12.5) with a BlockConformerEncoder (512 wide, 8 heads, FFN 2048, 6 blocks, linear input layer,
  ``rel_pos_espnet`` positions, ``block_rel_selfattn`` with block_size 10, no convolution module, no macaron FFN), an
  InterpolateRegulator (80 channels, 4 ratios), and a ConditionalCFM (sigma_min 1e-6, cosine t, training CFG 0.2,
  inference CFG 0.7) whose ConditionalDecoder has channels [256, 256], 4 transformer blocks per level, 12 middle
  levels, 8 heads of 64, GELU, dropout 0 = the ``glm-4-voice-decoder`` preset.
- Fields without effect in the reference code are accepted and ignored: ``solver`` (it always integrates with
  Euler), ``reg_loss_type`` (its loss is always the MSE), ``only_mask_loss``, ``output_type``, ``decoder_conf``,
  ``mel_feat_conf`` (its mel frame rule hard-codes 22,050 Hz and hop 256), ``n_spks``, ``spk_emb_dim``, and the
  encoder's convolution-module and chunk-training options that its settings switch off.
- Weight names: ``flow_released_names``; shapes and the token vocabulary are checked against the config.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor

from lit_keomni.nn.flow import FlowConfig, FlowDecoder

CONFIG_FILE, FLOW_FILE = "config.yaml", "flow.pt"
SAMPLE_RATE, HOP = 22050, 256
"""The reference's mel frame rule: int(tokens / input_frame_rate · 22050 / 256)."""
SEED_SETTERS = ("random.seed", "numpy.random.seed", "torch.manual_seed", "torch.cuda.manual_seed_all")

# --------------------------------------------------------------------------------------------------- config.yaml


class _Ref(str):
    """The text of a ``!ref`` tag, resolved after loading."""


class _SafeHyperLoader(yaml.SafeLoader):
    """PyYAML's safe loader plus HyperPyYAML's tags as plain data, and YAML 1.2 floats such as ``1e-06``."""


_SafeHyperLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


def _construct_new(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> dict[str, Any]:
    if isinstance(node, yaml.MappingNode):
        return {"_class": suffix, **loader.construct_mapping(node, deep=True)}
    if isinstance(node, yaml.SequenceNode):
        return {"_class": suffix, "_args": loader.construct_sequence(node, deep=True)}
    if loader.construct_scalar(node) in ("", None):
        return {"_class": suffix}
    raise yaml.constructor.ConstructorError(None, None, f"!new:{suffix} takes a mapping or a list", node.start_mark)


def _construct_apply(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> dict[str, Any]:
    if suffix not in SEED_SETTERS:
        raise yaml.constructor.ConstructorError(
            None, None, f"!apply:{suffix} would run code; only the seed setters {list(SEED_SETTERS)} are accepted "
                        f"(and never called)", node.start_mark)
    args = loader.construct_sequence(node, deep=True) if isinstance(node, yaml.SequenceNode) else \
        [loader.construct_object(node)]
    return {"_apply": suffix, "_args": args}


_SafeHyperLoader.add_multi_constructor("!new:", _construct_new)
_SafeHyperLoader.add_multi_constructor("!apply:", _construct_apply)
_SafeHyperLoader.add_constructor("!ref", lambda loader, node: _Ref(loader.construct_scalar(node)))
_SafeHyperLoader.add_constructor("!tuple", lambda loader, node: tuple(loader.construct_sequence(node, deep=True)))

_REF = re.compile(r"^<([A-Za-z_][\w]*)((?:\[[^\[\]]+\])*)>$")


def _resolve(value: Any, root: Mapping[str, Any], source: str, depth: int = 0) -> Any:
    if depth > 32:
        raise ValueError(f"{source}: !ref references nest deeper than 32 (a cycle?)")
    if isinstance(value, _Ref):
        m = _REF.match(value.strip())
        if m is None:
            raise ValueError(f"{source}: !ref {value!r} is not a plain reference <key> or <key[sub]>; expressions "
                             f"are not supported")
        target: Any = root
        for key in [m.group(1)] + re.findall(r"\[([^\[\]]+)\]", m.group(2)):
            if not isinstance(target, Mapping) or key not in target:
                raise ValueError(f"{source}: !ref {value} names key '{key}', which does not exist")
            target = target[key]
        return _resolve(target, root, source, depth + 1)
    if isinstance(value, dict):
        return {k: _resolve(v, root, source, depth) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_resolve(v, root, source, depth) for v in value)
    return value


def read_decoder_config(folder: str | Path) -> dict[str, dict[str, Any]]:
    """The ``flow`` and ``hift`` sections of a released decoder's config.yaml (``folder`` or the file itself), as
    plain data: each ``!new:`` object a dict with its class under ``_class``."""
    path = Path(folder)
    if path.is_dir():
        path = path / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (a released GLM-4-Voice decoder folder holds {CONFIG_FILE})")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_SafeHyperLoader)  # noqa: S506 - safe loader
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    out = {}
    for section in ("flow", "hift"):
        if not isinstance(data.get(section), dict):
            raise ValueError(f"{path}: field '{section}' missing or not a !new: mapping")
        out[section] = _resolve(data[section], data, str(path))
    return out


# -------------------------------------------------------------------------------------------- config -> FlowConfig

_CLASSES = {
    "flow": "cosyvoice.flow.flow.MaskedDiffWithXvec",
    "flow.encoder": "cosyvoice.transformer.encoder.BlockConformerEncoder",
    "flow.length_regulator": "cosyvoice.flow.length_regulator.InterpolateRegulator",
    "flow.decoder": "cosyvoice.flow.flow_matching.ConditionalCFM",
    "flow.decoder.cfm_params": "omegaconf.DictConfig",
    "flow.decoder.estimator": "cosyvoice.flow.decoder.ConditionalDecoder",
}
_DEFAULTS: dict[str, dict[str, Any]] = {  # the reference constructors' defaults (GLM-4-Voice eb00ce9)
    "flow": dict(input_size=512, output_size=80, spk_embed_dim=192, output_type="mel", vocab_size=4096,
                 input_frame_rate=50, only_mask_loss=True, decoder_conf=None, mel_feat_conf=None),
    "flow.encoder": dict(
        output_size=256, attention_heads=4, linear_units=2048, num_blocks=6, dropout_rate=0.1,
        positional_dropout_rate=0.1, attention_dropout_rate=0.0, input_layer="conv2d", pos_enc_layer_type="rel_pos",
        normalize_before=True, static_chunk_size=0, use_dynamic_chunk=False, global_cmvn=None,
        use_dynamic_left_chunk=False, positionwise_conv_kernel_size=1, macaron_style=True,
        selfattention_layer_type="rel_selfattn", activation_type="swish", use_cnn_module=True, cnn_module_kernel=15,
        causal=False, cnn_module_norm="batch_norm", key_bias=True, gradient_checkpointing=False, block_size=25),
    "flow.length_regulator": dict(out_channels=None, groups=1),
    "flow.decoder": dict(n_spks=1, spk_emb_dim=64),
    "flow.decoder.cfm_params": dict(sigma_min=1e-4, reg_loss_type=None),
    "flow.decoder.estimator": dict(channels=[256, 256], dropout=0.05, attention_head_dim=64, n_blocks=1,
                                   num_mid_blocks=2, num_heads=4, act_fn="snake"),
}
_REQUIRED = {
    "flow": ("encoder", "length_regulator", "decoder"),
    "flow.encoder": ("input_size",),
    "flow.length_regulator": ("channels", "sampling_ratios"),
    "flow.decoder": ("in_channels", "cfm_params", "estimator"),
    "flow.decoder.cfm_params": ("solver", "t_scheduler", "training_cfg_rate", "inference_cfg_rate"),
    "flow.decoder.estimator": ("in_channels", "out_channels"),
}
_FIXED = {  # options our network has exactly one value of
    "flow.encoder": dict(input_layer="linear", pos_enc_layer_type="rel_pos_espnet",
                         selfattention_layer_type="block_rel_selfattn", normalize_before=True, macaron_style=False,
                         use_cnn_module=False, activation_type="swish", key_bias=True, static_chunk_size=0,
                         use_dynamic_chunk=False, global_cmvn=None),
    "flow.length_regulator": dict(groups=1),
    "flow.decoder.estimator": dict(act_fn="gelu"),
}


def _section(value: Any, name: str, source: str) -> dict[str, Any]:
    """A ``!new:`` section with the reference's defaults filled in; wrong class, unknown or missing fields raise."""
    if not isinstance(value, Mapping):
        raise ValueError(f"{source}: field '{name}' must be a !new:{_CLASSES[name]} mapping, got {value!r}")
    cls = value.get("_class")
    if cls != _CLASSES[name]:
        raise ValueError(f"{source}: field '{name}' is !new:{cls}; only {_CLASSES[name]} is supported")
    body = dict(value["content"]) if name == "flow.decoder.cfm_params" else {k: v for k, v in value.items()
                                                                             if k != "_class"}
    if name == "flow.decoder.cfm_params" and set(value) - {"_class", "content"}:
        raise ValueError(f"{source}: field '{name}' must hold its options under 'content'")
    known = set(_DEFAULTS[name]) | set(_REQUIRED[name])
    unknown = sorted(set(body) - known)
    if unknown:
        raise ValueError(f"{source}: field '{name}.{unknown[0]}' is not an option of {_CLASSES[name]} that our "
                         f"FlowDecoder implements (known: {sorted(known)})")
    for field in _REQUIRED[name]:
        if field not in body:
            raise ValueError(f"{source}: field '{name}.{field}' missing")
    out = {**_DEFAULTS[name], **body}
    for field, want in _FIXED.get(name, {}).items():
        if out[field] != want:
            raise ValueError(f"{source}: field '{name}.{field}' is {out[field]!r}; our FlowDecoder implements only "
                             f"{want!r}")
    return out


def flow_config_from_released(section: Mapping[str, Any], *, source: str = CONFIG_FILE) -> FlowConfig:
    """The ``flow`` section of a released config.yaml (as ``read_decoder_config`` gives it) -> ``FlowConfig``; an
    option our module does not implement raises naming ``source`` and the field."""
    flow = _section(section, "flow", source)
    enc = _section(flow["encoder"], "flow.encoder", source)
    reg = _section(flow["length_regulator"], "flow.length_regulator", source)
    dec = _section(flow["decoder"], "flow.decoder", source)
    cfm = _section(dec["cfm_params"], "flow.decoder.cfm_params", source)
    est = _section(dec["estimator"], "flow.decoder.estimator", source)
    n_mels = flow["output_size"]
    checks = [  # (field, value, required value, why)
        ("flow.encoder.input_size", enc["input_size"], flow["input_size"], "the embedding width 'flow.input_size'"),
        ("flow.length_regulator.channels", reg["channels"], n_mels, "'flow.output_size'"),
        ("flow.length_regulator.out_channels", reg["out_channels"] or reg["channels"], n_mels, "'flow.output_size'"),
        ("flow.decoder.estimator.in_channels", est["in_channels"], 4 * n_mels, "4 × 'flow.output_size' (x, mu, "
                                                                              "speaker, prompt)"),
        ("flow.decoder.estimator.out_channels", est["out_channels"], n_mels, "'flow.output_size'"),
    ]
    for field, got, want, why in checks:
        if got != want:
            raise ValueError(f"{source}: field '{field}' is {got!r}; it must equal {why} = {want!r}")
    if cfm["t_scheduler"] not in ("cosine", "linear"):
        raise ValueError(f"{source}: field 'flow.decoder.cfm_params.t_scheduler' is {cfm['t_scheduler']!r}; our "
                         f"FlowDecoder implements 'cosine' and 'linear'")
    values = dict(
        vocab_size=flow["vocab_size"], token_dim=flow["input_size"], n_mels=n_mels, speaker_dim=flow["spk_embed_dim"],
        frame_rate=float(flow["input_frame_rate"]), sample_rate=SAMPLE_RATE, hop_length=HOP,
        encoder_dim=enc["output_size"], encoder_heads=enc["attention_heads"], encoder_ffn_dim=enc["linear_units"],
        encoder_layers=enc["num_blocks"], block_size=enc["block_size"], encoder_dropout=float(enc["dropout_rate"]),
        positional_dropout=float(enc["positional_dropout_rate"]),
        attention_dropout=float(enc["attention_dropout_rate"]), regulator_layers=len(reg["sampling_ratios"]),
        estimator_channels=tuple(est["channels"]), estimator_blocks=est["n_blocks"],
        estimator_mid_levels=est["num_mid_blocks"], estimator_heads=est["num_heads"],
        estimator_head_dim=est["attention_head_dim"], estimator_dropout=float(est["dropout"]),
        sigma_min=float(cfm["sigma_min"]), t_scheduler=cfm["t_scheduler"],
        training_cfg_rate=float(cfm["training_cfg_rate"]), inference_cfg_rate=float(cfm["inference_cfg_rate"]),
    )
    try:
        return FlowConfig(**values)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None


# ------------------------------------------------------------------------------------------------------ weights

_ENCODER = {"input_proj": "embed.out.0", "input_norm": "embed.out.1", "norm": "after_norm"}
_ENCODER_LAYER = {"attn_norm": "norm_mha", "ffn_norm": "norm_ff", "attn": "self_attn",
                  "attn.q": "self_attn.linear_q", "attn.k": "self_attn.linear_k", "attn.v": "self_attn.linear_v",
                  "attn.out": "self_attn.linear_out", "attn.pos": "self_attn.linear_pos",
                  "ffn.0": "feed_forward.w_1", "ffn.3": "feed_forward.w_2"}
_RESNET = {"time_proj": "mlp.1", "block1.conv": "block1.block.0", "block1.norm": "block1.block.1",
           "block2.conv": "block2.block.0", "block2.norm": "block2.block.1", "res_conv": "res_conv"}
_TRANSFORMER = {"norm1": "norm1", "q": "attn1.to_q", "k": "attn1.to_k", "v": "attn1.to_v", "out": "attn1.to_out.0",
                "norm2": "norm3", "ff_in": "ff.net.0.proj", "ff_out": "ff.net.2"}
_ESTIMATOR = {"time_in": "time_mlp.linear_1", "time_out": "time_mlp.linear_2",
              "final_block.conv": "final_block.block.0", "final_block.norm": "final_block.block.1",
              "final_proj": "final_proj"}
_TOP = {"token_embed": "input_embedding", "speaker_proj": "spk_embed_affine_layer", "encoder_proj": "encoder_proj"}


def _released_module(path: str, levels: int) -> str:
    parts = path.split(".")
    head, rest = parts[0], ".".join(parts[1:])
    if head in _TOP:
        return _TOP[head]
    if head == "regulator":  # regulator.net.{i}: the same Sequential indices
        return f"length_regulator.model.{parts[2]}"
    if head == "encoder":
        if parts[1] == "layers":
            return f"encoder.encoders.{parts[2]}.{_ENCODER_LAYER['.'.join(parts[3:])]}"
        return f"encoder.{_ENCODER[rest]}"
    if parts[1] in ("down", "mid", "up"):
        i, sub = int(parts[2]), parts[3:]
        base = f"decoder.estimator.{parts[1]}_blocks.{i}"
        if sub[0] == "resnet":
            return f"{base}.0.{_RESNET['.'.join(sub[1:])]}"
        if sub[0] == "blocks":
            return f"{base}.1.{sub[1]}.{_TRANSFORMER['.'.join(sub[2:])]}"
        # the last level's resampling is a plain Conv1d, the others are wrapped (Downsample1D / Upsample1D)
        return f"{base}.2" if i == levels - 1 else f"{base}.2.conv"
    return f"decoder.estimator.{_ESTIMATOR[rest]}"


def _shapes(target: FlowConfig | FlowDecoder) -> tuple[FlowConfig, dict[str, tuple[int, ...]]]:
    """The config and our weight shapes of a model, or of the model a config implies (built on the meta device)."""
    if isinstance(target, FlowDecoder):
        return target.config, {k: tuple(v.shape) for k, v in target.state_dict().items()}
    with torch.device("meta"):
        return target, {k: tuple(v.shape) for k, v in FlowDecoder(target).state_dict().items()}


def flow_released_names(target: FlowConfig | FlowDecoder) -> dict[str, str]:
    """Our ``FlowDecoder`` weight names -> the released ``flow.pt`` names, for every weight of the model (or of the
    model the config implies)."""
    config, shapes = _shapes(target)
    levels = len(config.estimator_channels)
    out = {}
    for key in shapes:
        module, leaf = key.rsplit(".", 1)
        out[key] = f"{_released_module(module, levels)}.{leaf}"
    return out


def flow_state_from_released(state: Mapping[str, Tensor], target: FlowConfig | FlowDecoder, *,
                             source: str = FLOW_FILE,
                             vocab_field: str = "FlowConfig field 'vocab_size'") -> dict[str, Tensor]:
    """Released ``flow.pt`` weights -> ours for the model ``target`` (or the one a config implies); missing,
    unexpected and mis-shaped weights raise naming ``source``, a token vocabulary other than the config's names
    ``source`` and ``vocab_field``."""
    config, shapes = _shapes(target)
    names = flow_released_names(target)
    emb = state.get(names["token_embed.weight"])
    if emb is not None and emb.shape[0] != config.vocab_size:
        raise ValueError(f"{source}: token vocabulary mismatch: weight 'input_embedding.weight' has {emb.shape[0]} "
                         f"speech tokens, but {vocab_field} is {config.vocab_size}")
    ours = {}
    for key, theirs in names.items():
        if theirs not in state:
            raise ValueError(f"{source}: weight '{theirs}' missing (the config implies it, shape {list(shapes[key])})")
        if tuple(state[theirs].shape) != shapes[key]:
            raise ValueError(f"{source}: weight '{theirs}' has shape {list(state[theirs].shape)}, the config implies "
                             f"{list(shapes[key])}")
        ours[key] = state[theirs]
    extra = sorted(set(state) - set(names.values()))
    if extra:
        raise ValueError(f"{source}: weight '{extra[0]}' has no counterpart in our FlowDecoder ({len(extra)} such)")
    return ours


def flow_state_to_released(model: FlowDecoder) -> dict[str, Tensor]:
    """Our weights -> the released ``flow.pt`` names (what ``torch.save`` of the reference's state dict holds)."""
    names = flow_released_names(model)
    return {names[k]: v for k, v in model.state_dict().items()}


def load_released_flow(folder_or_file: str | Path, config: FlowConfig | None = None) -> FlowDecoder:
    """A released decoder folder (config.yaml + flow.pt), or a flow.pt with config.yaml beside it (or ``config``),
    -> our ``FlowDecoder`` in eval mode on the CPU."""
    path = Path(folder_or_file)
    weights = path / FLOW_FILE if path.is_dir() else path
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: no such file (a released GLM-4-Voice decoder folder holds {FLOW_FILE})")
    if config is None:
        cfg = weights.parent / CONFIG_FILE
        config = flow_config_from_released(read_decoder_config(cfg)["flow"], source=str(cfg))
        vocab_field = f"{cfg} field 'flow.vocab_size'"
    else:
        vocab_field = "FlowConfig field 'vocab_size'"
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same message
        raise ValueError(f"{weights}: not a readable state dict ({type(e).__name__}: {e})") from None
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{weights}: expected a state dict of tensors (torch.save(flow.state_dict()))")
    model = FlowDecoder(config)
    model.load_state_dict(flow_state_from_released(state, model, source=str(weights), vocab_field=vocab_field))
    return model.eval()


__all__ = ["read_decoder_config", "flow_config_from_released", "flow_released_names", "flow_state_from_released",
           "flow_state_to_released", "load_released_flow"]


# ------------------------------------------------------------------------------------------------------ writing


def _yaml_list(values: Any) -> str:
    return "[" + ", ".join(_yaml_list(v) if isinstance(v, (list, tuple)) else repr(v) for v in values) + "]"


def released_config_yaml(flow: FlowConfig, hift: Any) -> str:
    """config.yaml of a glm-4-voice-decoder folder for ``flow`` and ``hift`` (an ``nn.hift.HiFTConfig``), with every
    option as the released file has it: what the reference's ``load_hyperpyyaml`` builds its decoder from and
    ``read_decoder_config`` reads back to the same configs. The reference hard-codes 22,050 Hz and hop 256 for the
    flow's mel frames: another rate or hop cannot be written."""
    if (flow.sample_rate, flow.hop_length) != (SAMPLE_RATE, HOP) or hift.sampling_rate != SAMPLE_RATE:
        raise ValueError(f"the released decoder layout decodes {SAMPLE_RATE} Hz mels of hop {HOP}; this decoder has "
                         f"sample_rate {flow.sample_rate} / {hift.sampling_rate} and hop_length {flow.hop_length}")
    if flow.n_mels != hift.in_channels:
        raise ValueError(f"the flow writes {flow.n_mels}-bin mels but the HiFT reads {hift.in_channels}")
    for field, released in (("inference_start", 0.0), ("inference_temperature", 1.0)):
        if getattr(flow, field) != released:
            raise ValueError(f"the released decoder's sampler starts from unit noise (flow_inference.py has no start "
                             f"time or temperature), but this flow's config field '{field}' is {getattr(flow, field)}; "
                             f"set it to {released:g} in the export's config.json to release it")
    n = flow.n_mels
    return f"""# set random seed, so that you may reproduce your result.
__set_seed1: !apply:random.seed [1986]
__set_seed2: !apply:numpy.random.seed [1986]
__set_seed3: !apply:torch.manual_seed [1986]
__set_seed4: !apply:torch.cuda.manual_seed_all [1986]

# fixed params
sample_rate: {SAMPLE_RATE}
spk_embed_dim: {flow.speaker_dim}

flow: !new:cosyvoice.flow.flow.MaskedDiffWithXvec
    input_size: {flow.token_dim}
    output_size: {n}
    spk_embed_dim: !ref <spk_embed_dim>
    output_type: 'mel'
    vocab_size: {flow.vocab_size}
    input_frame_rate: {flow.frame_rate!r}
    only_mask_loss: True
    encoder: !new:cosyvoice.transformer.encoder.BlockConformerEncoder
        output_size: {flow.encoder_dim}
        attention_heads: {flow.encoder_heads}
        linear_units: {flow.encoder_ffn_dim}
        num_blocks: {flow.encoder_layers}
        dropout_rate: {flow.encoder_dropout!r}
        positional_dropout_rate: {flow.positional_dropout!r}
        attention_dropout_rate: {flow.attention_dropout!r}
        normalize_before: True
        input_layer: 'linear'
        pos_enc_layer_type: 'rel_pos_espnet'
        selfattention_layer_type: 'block_rel_selfattn'
        block_size: {flow.block_size}
        input_size: {flow.token_dim}
        use_cnn_module: False
        macaron_style: False
    length_regulator: !new:cosyvoice.flow.length_regulator.InterpolateRegulator
        channels: {n}
        sampling_ratios: {_yaml_list([1] * flow.regulator_layers)}
    decoder: !new:cosyvoice.flow.flow_matching.ConditionalCFM
        in_channels: {3 * n}
        n_spks: 1
        spk_emb_dim: {n}
        cfm_params: !new:omegaconf.DictConfig
            content:
                sigma_min: {flow.sigma_min!r}
                solver: 'euler'
                t_scheduler: '{flow.t_scheduler}'
                training_cfg_rate: {flow.training_cfg_rate!r}
                inference_cfg_rate: {flow.inference_cfg_rate!r}
                reg_loss_type: 'l1'
        estimator: !new:cosyvoice.flow.decoder.ConditionalDecoder
            in_channels: {4 * n}
            out_channels: {n}
            channels: {_yaml_list(flow.estimator_channels)}
            dropout: {flow.estimator_dropout!r}
            attention_head_dim: {flow.estimator_head_dim}
            n_blocks: {flow.estimator_blocks}
            num_mid_blocks: {flow.estimator_mid_levels}
            num_heads: {flow.estimator_heads}
            act_fn: 'gelu'

hift: !new:cosyvoice.hifigan.generator.HiFTGenerator
    in_channels: {hift.in_channels}
    base_channels: {hift.base_channels}
    nb_harmonics: {hift.nb_harmonics}
    sampling_rate: !ref <sample_rate>
    nsf_alpha: {hift.nsf_alpha!r}
    nsf_sigma: {hift.nsf_sigma!r}
    nsf_voiced_threshold: {hift.nsf_voiced_threshold!r}
    upsample_rates: {_yaml_list(hift.upsample_rates)}
    upsample_kernel_sizes: {_yaml_list(hift.upsample_kernel_sizes)}
    istft_params:
        n_fft: {hift.istft_n_fft}
        hop_len: {hift.istft_hop}
    resblock_kernel_sizes: {_yaml_list(hift.resblock_kernel_sizes)}
    resblock_dilation_sizes: {_yaml_list(hift.resblock_dilation_sizes)}
    source_resblock_kernel_sizes: {_yaml_list(hift.source_resblock_kernel_sizes)}
    source_resblock_dilation_sizes: {_yaml_list(hift.source_resblock_dilation_sizes)}
    lrelu_slope: {hift.lrelu_slope!r}
    audio_limit: {hift.audio_limit!r}
    f0_predictor: !new:cosyvoice.hifigan.f0_predictor.ConvRNNF0Predictor
        num_class: 1
        in_channels: {hift.in_channels}
        cond_channels: {hift.f0_channels}
"""
