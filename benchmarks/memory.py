"""Peak training memory per stage: measured at the tiny CPU recipes' sizes, estimated at the paper recipes' sizes.

    python benchmarks/memory.py [--stages stage1 stage2 ... --steps 3 --gpus N]

Measured (tiny): each stage in a fresh process (``--child``) builds the network of its CPU recipe
(``recipes/stageN.yaml``: preset + overrides, vocabulary of the built-in tokenizer + speech tokens), and runs
``--steps`` training steps on random inputs of the recipe's batch shape: forward under bf16 autocast where the recipe
trains in bf16-mixed + loss + backward + ``AdamW.step``. Peak = the process's peak RSS (``ru_maxrss``) minus its
RSS before the model was built (CPU only, as the tiny recipes run). Beside it, the model states alone:
16 bytes per trainable parameter (float32 weights, gradients, AdamW m and v) + 4 per frozen one.

Estimated (paper): the paper recipe's network (``recipes/paper/stageN.yaml``) is built on the meta device (no memory);
per GPU, FSDP2 over N = num_nodes · devices GPUs (``--gpus`` overrides), bf16-mixed as ``apply_fsdp`` sets it up:

    states      = (bytes(P) + 12 · P_train) / N         sharded weights in their dtype (float32; a LoRA base in bf16);
                                                        float32 grads + AdamW m, v of the trainable ones
    gathered    = 2 · P_root + 8 · P_block              root group kept whole in bf16; two blocks gathered in bf16
                                                        (current + prefetched) and one block's float32 grads before
                                                        the reduce-scatter
    activations = Σ_groups L · b · t · A                without activation checkpointing, per trained layer group
                = Σ_groups L · b · t · 2h + b · t · A   with it (block inputs kept, one block recomputed at a time)
    A           = 2 · (13 h + 4 kv + c · I) bytes/token saved per layer in bf16 (norm inputs in float32, q/k/v, rotary,
                  attention in/out, MLP in/out; c = 4 SwiGLU, 2 GELU; Whisper decoder layers + 12 h + 8 kv for the
                  cross-attention); layers with no trainable parameter (frozen encoder) keep none
    logits      = b · t · V · 10                        bf16 logits, their float32 copy for the loss and its gradient
                = c · V · 10 + 4 · V · h                with loss_chunk c: one chunk's logits, softmax and gradient,
                                                        and the float32 gradient of a trained output layer
b = batch per GPU, t = positions per row in that layer group, h = width, kv = key/value width, I = FFN width,
V = padded vocabulary. Not counted: the CUDA context (~0.5-1 GB), allocator fragmentation, NCCL buffers, the data
loader. A planning figure, not a measurement.

To add a stage, add one ``Stage`` row to ``STAGES``: a builder of its tiny network + one training step, and a builder of
its paper network + its layer groups.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from torch import Tensor, nn

from common import machine_line

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lit_keomni.audio import SAMPLE_RATE  # noqa: E402
from lit_keomni.configs import SpeechTokenizerConfig, TransformerConfig  # noqa: E402
from lit_keomni.nn.adapter import SpeechAdapter, speech_frames  # noqa: E402
from lit_keomni.nn.keomni import KeOmni  # noqa: E402
from lit_keomni.nn.transformer import Block, Transformer  # noqa: E402
from lit_keomni.nn.whisper import DecoderLayer, EncoderLayer, SpeechEncoder, SpeechTokenizerModel  # noqa: E402
from lit_keomni.text.tokenizer import TextTokenizer  # noqa: E402

GiB = 1024**3
MiB = 1024**2


# ----------------------------------------------------------------------------------------------------- recipes
def recipe(path: str) -> dict[str, Any]:
    with open(ROOT / path, encoding="utf-8") as f:
        return yaml.safe_load(f)


def model_args(r: dict[str, Any]) -> dict[str, Any]:
    return r["model"]["init_args"]


def data_args(r: dict[str, Any]) -> dict[str, Any]:
    return r["data"]["init_args"]


def speech_vocab(text_vocab: int, codebook: int) -> int:
    """Size of a text vocabulary extended with ``codebook`` speech tokens and the dialogue specials."""
    tok = TextTokenizer.from_file(ROOT / "data/builtin/tokenizer.json")
    base = tok.vocab_size
    tok.add_speech_tokens(codebook)
    return text_vocab + tok.vocab_size - base


def lm_config(r: dict[str, Any], vocab: int) -> TransformerConfig:
    m = model_args(r)
    return TransformerConfig.from_name(m["config"], **(m.get("overrides") or {})).replace(vocab_size=vocab)


def tokenizer_config(r: dict[str, Any]) -> SpeechTokenizerConfig:
    m = model_args(r)
    return SpeechTokenizerConfig.from_name(m["config"], **(m.get("overrides") or {}))


# ----------------------------------------------------------------------------------------------------- tiny steps
TINY_TEXT_VOCAB = TextTokenizer.from_file(ROOT / "data/builtin/tokenizer.json").vocab_size if (
    ROOT / "data/builtin/tokenizer.json").is_file() else 512


def lm_loss(logits: Tensor, target: Tensor) -> Tensor:
    return F.cross_entropy(logits.float().flatten(0, 1), target.flatten())


def tiny_stage1() -> tuple[nn.Module, Callable[[], Tensor], bool]:
    r = recipe("recipes/stage1.yaml")
    c = tokenizer_config(r).replace(vocab_size=TINY_TEXT_VOCAB)
    model = SpeechTokenizerModel(c)
    b, seconds, text = data_args(r).get("batch_size", 32), 4, 40
    mel = torch.randn(b, c.n_mels, seconds * 100)
    lengths = torch.full((b,), seconds * 100)
    tokens = torch.randint(0, c.vocab_size, (b, text + 1))

    def loss() -> Tensor:
        logits, enc = model(mel, lengths, tokens[:, :-1])
        out = lm_loss(logits, tokens[:, 1:])
        return out + enc.vq.commitment_loss if enc.vq is not None else out
    return model, loss, str(r["trainer"].get("precision", "32")).startswith("bf16")


def tiny_lm(path: str, length_key: str, default_len: int) -> Callable[[], tuple[nn.Module, Callable[[], Tensor], bool]]:
    def build() -> tuple[nn.Module, Callable[[], Tensor], bool]:
        r = recipe(path)
        codebook = SpeechTokenizerConfig.from_name("tiny").codebook_size
        model = Transformer(lm_config(r, speech_vocab(TINY_TEXT_VOCAB, codebook)))
        if model_args(r).get("lora"):
            from lit_keomni.nn.lora import LoRAConfig, apply_lora

            apply_lora(model, LoRAConfig.from_dict(model_args(r)["lora"]))
        d = data_args(r)
        b, t = d.get("batch_size", 16), d.get(length_key, default_len)
        ids = torch.randint(0, model.config.vocab_size, (b, t + 1))
        return model, lambda: lm_loss(model(ids[:, :-1]), ids[:, 1:]), str(r["trainer"]["precision"]).startswith("bf16")
    return build


def keomni_model(llm: Transformer, enc_config: SpeechTokenizerConfig, stack: int, full_encoder: bool) -> KeOmni:
    layers = enc_config.encoder_layers if full_encoder else enc_config.vq_position
    encoder = SpeechEncoder(enc_config.replace(encoder_layers=layers, vq_position=layers, vq=False))
    return KeOmni(encoder, SpeechAdapter(enc_config.d_model, llm.config.n_embd, stack), llm)


def tiny_stage4_keomni() -> tuple[nn.Module, Callable[[], Tensor], bool]:
    r = recipe("recipes/stage4_keomni.yaml")
    codebook = SpeechTokenizerConfig.from_name("tiny").codebook_size
    llm = Transformer(lm_config(r, speech_vocab(TINY_TEXT_VOCAB, codebook)))
    model = keomni_model(llm, SpeechTokenizerConfig.from_name("tiny"), model_args(r).get("stack", 5), False)
    d = data_args(r)
    b, t, seconds = d.get("batch_size", 8), d.get("max_length", 400), 4
    slots = speech_frames(seconds * SAMPLE_RATE, model.stack)
    ids = torch.randint(0, llm.config.vocab_size, (b, t + 1))
    mask = torch.zeros(b, t, dtype=torch.bool)
    mask[:, 8 : 8 + slots] = True
    mels = torch.randn(b, model.encoder.config.n_mels, seconds * 100)
    lengths = torch.full((b,), seconds * 100)
    return model, lambda: lm_loss(model(ids[:, :-1], mask, mels, lengths), ids[:, 1:]), True


def child(name: str, steps: int) -> dict[str, Any]:
    """Build and train one stage's tiny network in this process; memory figures as a dict."""
    torch.manual_seed(0)
    rss0 = _rss_now()
    model, loss_fn, bf16 = STAGES[name].tiny()
    model.train()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    for _ in range(steps):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"trainable": trainable, "frozen": frozen, "peak_delta": peak - rss0, "states": 16 * trainable + 4 * frozen,
            "bf16": bf16}


def _rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# ----------------------------------------------------------------------------------------------------- paper estimate
@dataclass
class Group:
    """Repeated layers that run on ``tokens`` positions per row."""

    layers: list[nn.Module]
    tokens: int


@dataclass
class Paper:
    model: nn.Module
    groups: list[Group]
    batch: int
    logit_tokens: int
    vocab: int
    gpus: int
    activation_checkpointing: bool
    loss_chunk: int = 0


def layer_bytes_per_token(layer: nn.Module) -> tuple[int, int]:
    """(A, h): activation bytes per token saved by one layer in bf16 (see the module docstring), and its width."""
    if isinstance(layer, Block):
        h, kv = layer.attn.q_proj.in_features, layer.attn.k_proj.out_features
        return 2 * (13 * h + 4 * kv + 4 * layer.mlp.up_proj.out_features), h
    if isinstance(layer, (EncoderLayer, DecoderLayer)):
        h = layer.fc1.in_features
        a = 2 * (13 * h + 4 * h + 2 * layer.fc1.out_features)
        return a + (2 * (12 * h + 8 * h) if isinstance(layer, DecoderLayer) else 0), h
    raise TypeError(f"no activation formula for {type(layer).__name__}")


def estimate(p: Paper, gpus: int | None) -> dict[str, float]:
    n = gpus or p.gpus
    params = list(p.model.parameters())
    P = sum(x.numel() for x in params)
    P_train = sum(x.numel() for x in params if x.requires_grad)
    in_blocks = {id(x) for g in p.groups for layer in g.layers for x in layer.parameters()}
    P_root = sum(x.numel() for x in params if id(x) not in in_blocks)
    P_block = max(sum(x.numel() for x in layer.parameters()) for g in p.groups for layer in g.layers)
    act, one_block = 0.0, 0.0
    for g in p.groups:
        if not any(x.requires_grad for layer in g.layers for x in layer.parameters()):
            continue  # frozen (no_grad) layers keep no activations for backward
        for layer in g.layers:
            a, h = layer_bytes_per_token(layer)
            act += p.batch * g.tokens * (2 * h if p.activation_checkpointing else a)
            one_block = max(one_block, p.batch * g.tokens * a)
    if p.activation_checkpointing:
        act += one_block
    head = p.model.get_parameter(_head_name(p.model)) if p.loss_chunk else None
    h = head.shape[1] if head is not None and head.requires_grad else 0  # a frozen head (LoRA) gets no gradient
    logits = (min(p.loss_chunk, p.batch * p.logit_tokens) * p.vocab * 10 + 4 * p.vocab * h if p.loss_chunk
              else p.batch * p.logit_tokens * p.vocab * 10)
    weights = sum(x.numel() * x.element_size() for x in params)
    out = {"P": P, "P_train": P_train, "gpus": n, "states": (weights + 12 * P_train) / n,
           "gathered": 2 * P_root + 8 * P_block, "activations": act, "logits": logits}
    out["total"] = out["states"] + out["gathered"] + out["activations"] + out["logits"]
    return out


def _head_name(model: nn.Module) -> str:
    return next(n for n, _ in model.named_parameters() if n.endswith("lm_head.weight"))


def _on_meta(fn: Callable[[], nn.Module]) -> nn.Module:
    with torch.device("meta"):
        return fn()


def _paper_common(r: dict[str, Any]) -> tuple[int, bool]:
    t = r["trainer"]
    return int(t.get("num_nodes", 1)) * int(t.get("devices", 1)), bool(model_args(r).get("activation_checkpointing"))


def paper_stage1() -> Paper:
    r = recipe("recipes/paper/stage1.yaml")
    c = tokenizer_config(r)
    model = _on_meta(lambda: SpeechTokenizerModel(c))
    gpus, ac = _paper_common(r)
    frames = 2 * c.max_source_positions  # 30 s of 100 Hz mel → 1500 encoder frames at 50 Hz
    enc = list(model.encoder.layers)
    groups = [Group(enc[: c.vq_position], frames // 2), Group(enc[c.vq_position :], frames // 2 // c.pool),
              Group(list(model.decoder.layers), c.max_target_positions)]
    return Paper(model, groups, data_args(r)["batch_size"], c.max_target_positions, c.vocab_size, gpus, ac)


def paper_lm(path: str, tokens: Callable[[dict[str, Any], TransformerConfig], int],
             vocab: int | None = None) -> Callable[[], Paper]:
    """An LM paper recipe; ``vocab``: rows of a released model's own vocabulary (else the preset's + speech tokens).
    The recipe's ``lora`` freezes the base in its ``base_dtype`` and adds the adapters."""
    def build() -> Paper:
        from lit_keomni.nn.lora import LoRAConfig, apply_lora

        r = recipe(path)
        m = model_args(r)
        codebook = SpeechTokenizerConfig.from_name("whisper-large-v3-12.5hz").codebook_size
        base = TransformerConfig.from_name(m["config"])
        c = lm_config(r, vocab or speech_vocab(base.vocab_size, codebook))
        model = _on_meta(lambda: Transformer(c))
        if m.get("lora"):
            lora = LoRAConfig.from_dict(m["lora"])
            _on_meta(lambda: apply_lora(model, lora))
            dtype = getattr(torch, lora.base_dtype) if lora.base_dtype else None
            for x in model.parameters():
                if not x.requires_grad and dtype is not None:
                    x.data = x.data.to(dtype)  # every frozen weight stored in the base dtype
        gpus, ac = _paper_common(r)
        t = tokens(data_args(r), c)
        batch = data_args(r)["batch_size"]
        return Paper(model, [Group(list(model.blocks), t)], batch, t, c.padded_vocab_size, gpus, ac,
                     int(m.get("loss_chunk") or 0))
    return build


def paper_stage4_keomni() -> Paper:
    r = recipe("recipes/paper/stage4_keomni.yaml")
    m = model_args(r)
    c = TransformerConfig.from_name(m["config"], **(m.get("overrides") or {}))
    c = c.replace(vocab_size=c.vocab_size + 8)  # the role tokens added to the LLM's tokenizer
    enc = SpeechTokenizerConfig.from_name("whisper-large-v3-12.5hz").replace(pool=1, vq=False, block_seconds=None,
                                                                            causal_conv=False)
    model = _on_meta(lambda: keomni_model(Transformer(c), enc, m.get("stack", 5), True))
    gpus, ac = _paper_common(r)
    t = data_args(r)["max_length"]
    groups = [Group(list(model.encoder.layers), 2 * enc.max_source_positions // 2), Group(list(model.llm.blocks), t)]
    return Paper(model, groups, data_args(r)["batch_size"], t, c.padded_vocab_size, gpus, ac,
                 int(m.get("loss_chunk") or 0))


@dataclass
class Stage:
    tiny: Callable[[], tuple[nn.Module, Callable[[], Tensor], bool]]
    """Tiny recipe network, a closure computing one batch's loss, and whether the recipe trains in bf16-mixed."""
    paper: Callable[[], Paper]
    """Paper recipe network on the meta device, its layer groups and batch shape."""
    what: str


STAGES: dict[str, Stage] = {
    "stage1": Stage(tiny_stage1, paper_stage1, "speech tokenizer (Whisper enc-dec + VQ)"),
    "stage2": Stage(tiny_lm("recipes/stage2.yaml", "max_length", 256),
                    paper_lm("recipes/paper/stage2.yaml", lambda d, c: 512), "text-to-token LM"),
    "stage3": Stage(tiny_lm("recipes/stage3.yaml", "seq_len", 512),
                    paper_lm("recipes/paper/stage3.yaml", lambda d, c: d["seq_len"]), "speech-text pretraining LM"),
    "stage4": Stage(tiny_lm("recipes/stage4.yaml", "max_length", 640),
                    paper_lm("recipes/paper/stage4.yaml", lambda d, c: d["max_length"]), "SFT, GLM-4-Voice mode"),
    "stage4_keomni": Stage(tiny_stage4_keomni, paper_stage4_keomni, "SFT, KE-Omni mode (frozen encoder)"),
    "stage4_lora": Stage(tiny_lm("recipes/stage4_lora.yaml", "max_length", 640),
                         paper_lm("recipes/paper/stage4_glm4voice_lora.yaml", lambda d, c: d["max_length"],
                                  vocab=168960), "SFT with LoRA, glm-4-voice-9b on 1 GPU"),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--stages", nargs="+", choices=sorted(STAGES), default=list(STAGES))
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--gpus", type=int, default=None, help="GPUs for the paper estimate (default: the paper recipe's)")
    p.add_argument("--child", choices=sorted(STAGES), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a.steps)))
        return

    print(machine_line(torch.device("cpu")))
    print(f"tiny: CPU recipes' networks, {a.steps} steps each (forward + loss + backward + AdamW) on random inputs of "
          f"the recipe's batch shape, one fresh process per stage; peak = peak RSS − RSS before building the model")
    print(f"{'stage':<15}{'params':>10}{'states MiB':>12}{'peak MiB':>10}  batch")
    for name in a.stages:
        run = subprocess.run([sys.executable, __file__, "--child", name, "--steps", str(a.steps)],
                             capture_output=True, text=True, cwd=ROOT)
        if run.returncode:
            print(f"{name:<15} failed: {run.stderr.strip().splitlines()[-1] if run.stderr.strip() else run.returncode}")
            continue
        m = json.loads(run.stdout.strip().splitlines()[-1])
        n = m["trainable"] + m["frozen"]
        frozen = f" ({m['frozen'] / 1e6:.2f} M frozen)" if m["frozen"] else ""
        print(f"{name:<15}{n / 1e6:>9.2f}M{m['states'] / MiB:>12.1f}{m['peak_delta'] / MiB:>10.0f}  "
              f"{'bf16 autocast' if m['bf16'] else 'float32'}{frozen}")

    print("\npaper recipes, estimated per GPU under FSDP2 (formula in benchmarks/memory.py), bf16-mixed:")
    print(f"{'stage':<15}{'params':>9}{'GPUs':>6}{'b×t':>12}{'AC':>4}{'states':>9}{'gathered':>10}{'activ.':>9}"
          f"{'logits':>9}{'total GiB':>11}")
    for name in a.stages:
        pp = STAGES[name].paper()
        e = estimate(pp, a.gpus)
        shape = f"{pp.batch}×{max(g.tokens for g in pp.groups)}"
        ac = "on" if pp.activation_checkpointing else "off"
        print(f"{name:<15}{e['P'] / 1e9:>8.2f}B{e['gpus']:>6}{shape:>12}{ac:>4}"
              f"{e['states'] / GiB:>9.1f}{e['gathered'] / GiB:>10.1f}{e['activations'] / GiB:>9.1f}"
              f"{e['logits'] / GiB:>9.1f}{e['total'] / GiB:>11.1f}")
    for name in a.stages:
        pp = STAGES[name].paper()
        if pp.loss_chunk:
            full = estimate(Paper(**{**pp.__dict__, "loss_chunk": 0}), a.gpus)
            print(f"{name}: loss_chunk {pp.loss_chunk} -> logits {estimate(pp, a.gpus)['logits'] / GiB:.1f} GiB; "
                  f"full logits would take {full['logits'] / GiB:.1f} GiB (total {full['total'] / GiB:.1f})")
    print("b×t: rows per GPU × positions of the longest layer group (stage 1: 30 s = 1500 encoder frames; stage 2: "
          "rows of ≤ 512 tokens; stage 4 KE-Omni: 3840 LLM positions, frozen 32-layer Whisper encoder)")


if __name__ == "__main__":
    main()
