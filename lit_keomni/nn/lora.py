"""Low-rank adapters (LoRA, Hu et al. 2021) on the linear layers of an LM, for fine-tuning a 9B model on one GPU.

``apply_lora`` turns the chosen ``nn.Linear`` layers of a model into ``LoRALinear``: the layer's own weight (and
bias) stays where it was, under the same state-dict name, frozen (optionally stored in bf16), and two small trained
matrices add ``scale · B A x`` with ``A`` (rank x in, Kaiming-uniform) and ``B`` (out x rank, zeros), so the model
computes exactly what it computed before the first step. Everything else is frozen. ``merge_lora`` folds
``W + scale · B A`` back into plain ``nn.Linear`` layers (the export every later stage, and transformers through
``lit_keomni.layouts``, loads); ``lora_state_dict`` is what a checkpoint keeps (the trained weights only).
The adapters live inside the blocks, so FSDP2 shards them with their block and ``torch.compile`` compiles them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LORA_FILE = "lora.safetensors"
"""An export's unmerged adapters (``merge_lora: false``), merged into its weights when it is loaded."""
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""Every linear layer of a ``Transformer`` block (attention and SwiGLU MLP)."""


@dataclass
class LoRAConfig:
    """What a recipe's ``model.lora`` gives."""

    rank: int = 16
    """Rank r of each adapter."""
    alpha: float = 32.0
    """Scale numerator: the adapter output is multiplied by alpha / rank."""
    dropout: float = 0.0
    """Dropout on the adapter's input (not on the frozen path)."""
    targets: Sequence[str] = field(default_factory=lambda: DEFAULT_TARGETS)
    """Names (last component) of the linear layers that get an adapter."""
    base_dtype: str | None = "bfloat16"
    """dtype the frozen weights are stored in ("bfloat16", "float32", or None = keep)."""

    @classmethod
    def from_dict(cls, values: Mapping[str, object], source: str = "model.lora") -> LoRAConfig:
        known = {"rank", "alpha", "dropout", "targets", "base_dtype"}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{source}: unknown field(s) {unknown}; known: {sorted(known)}")
        config = cls(**values)  # type: ignore[arg-type]
        if config.rank < 1:
            raise ValueError(f"{source}: field 'rank' is {config.rank}, must be >= 1")
        if not 0.0 <= config.dropout < 1.0:
            raise ValueError(f"{source}: field 'dropout' is {config.dropout}, must lie in [0, 1)")
        if config.base_dtype not in (None, "bfloat16", "float32"):
            raise ValueError(f"{source}: field 'base_dtype' is {config.base_dtype!r}; expected 'bfloat16', "
                             f"'float32' or null")
        config.targets = tuple(config.targets)
        return config

    def to_dict(self) -> dict[str, object]:
        return {"rank": self.rank, "alpha": self.alpha, "dropout": self.dropout, "targets": list(self.targets),
                "base_dtype": self.base_dtype}


class LoRALinear(nn.Linear):
    """``nn.Linear`` (frozen) + ``scale · lora_b @ lora_a``; the frozen weight keeps the name ``weight``."""

    def __init__(self, in_features: int, out_features: int, bias: bool, rank: int, alpha: float,
                 dropout: float = 0.0, device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.rank, self.scale = rank, alpha / rank
        self.lora_a = nn.Parameter(torch.empty(rank, in_features, device=device, dtype=torch.float32))
        self.lora_b = nn.Parameter(torch.empty(out_features, rank, device=device, dtype=torch.float32))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_lora()

    def reset_parameters(self) -> None:  # also what meta-device materialisation calls
        super().reset_parameters()
        if hasattr(self, "lora_a"):
            self.reset_lora()

    @torch.no_grad()
    def reset_lora(self) -> None:
        """A as nn.Linear initialises its weight, B zero: the adapter starts as the identity change."""
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        nn.init.zeros_(self.lora_b)

    def forward(self, x: Tensor) -> Tensor:
        out = F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        low = F.linear(F.linear(self.lora_dropout(x), self.lora_a.to(x.dtype)), self.lora_b.to(x.dtype))
        return out + self.scale * low

    def delta(self) -> Tensor:
        """The weight change the adapter makes, ``scale · B A`` (out, in), in float32."""
        return self.scale * (self.lora_b.float() @ self.lora_a.float())

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, scale={self.scale:g}"


def apply_lora(model: nn.Module, config: LoRAConfig) -> nn.Module:
    """Give every ``nn.Linear`` of ``model`` named in ``config.targets`` an adapter, in place; freeze all other
    parameters. Raises when no layer matches (a misspelt target)."""
    dtype = None if config.base_dtype is None else getattr(torch, config.base_dtype)
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if name in config.targets and type(child) is nn.Linear:
                lora = LoRALinear(child.in_features, child.out_features, child.bias is not None, config.rank,
                                  config.alpha, config.dropout, device=child.weight.device,
                                  dtype=dtype or child.weight.dtype)
                with torch.no_grad():
                    lora.weight.copy_(child.weight)
                    if child.bias is not None:
                        lora.bias.copy_(child.bias)
                setattr(parent, name, lora)
                replaced += 1
    if not replaced:
        raise ValueError(f"model.lora: field 'targets' {list(config.targets)} names no linear layer of the model")
    for n, p in model.named_parameters():
        p.requires_grad_(".lora_" in f".{n}")
    return model


def is_lora_parameter(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in ("lora_a", "lora_b")


def lora_state_dict(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The adapter weights of a state dict (what a LoRA checkpoint keeps beside the reference to its base)."""
    return {k: v for k, v in state.items() if is_lora_parameter(k)}


@torch.no_grad()
def merge_lora(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Fold each adapter into its layer: ``LoRALinear`` -> ``nn.Linear`` with ``W + scale · B A``, in ``dtype``
    (None: float32); in place. The merged model computes what the adapted one computed."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                plain = nn.Linear(child.in_features, child.out_features, child.bias is not None,
                                  device=child.weight.device, dtype=dtype or torch.float32)
                plain.weight.copy_(child.weight.float() + child.delta())
                if child.bias is not None:
                    plain.bias.copy_(child.bias)
                setattr(parent, name, plain)
    return model


def base_state_dict(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A state dict without its adapters, every floating tensor in float32 (the layout of an export)."""
    return {k: (v.float() if v.is_floating_point() else v) for k, v in state.items() if not is_lora_parameter(k)}


def merge_lora_state(state: Mapping[str, Tensor], config: LoRAConfig) -> dict[str, Tensor]:
    """A state dict with adapters (``X.lora_a``, ``X.lora_b`` beside ``X.weight``) -> plain weights
    ``X.weight + alpha / rank · B A``, every floating tensor in float32 (the layout of an export)."""
    out = base_state_dict(state)
    scale = config.alpha / config.rank
    for k in state:
        if k.endswith(".lora_a"):
            prefix = k.removesuffix(".lora_a")
            if prefix + ".lora_b" not in state or prefix + ".weight" not in state:
                raise ValueError(f"LoRA weights: '{k}' without '{prefix}.lora_b' or '{prefix}.weight'")
            out[prefix + ".weight"] = out[prefix + ".weight"] + scale * (state[prefix + ".lora_b"].float()
                                                                         @ state[k].float())
    return out


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
