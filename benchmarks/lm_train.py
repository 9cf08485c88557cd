"""LM training-step speed: our ``Transformer`` beside a same-config Hugging Face ``LlamaForCausalLM``, in one process.

    python benchmarks/lm_train.py [--preset small --batch 8 --seq 256 --steps 10 --dtype float32 --compile
                                   --threads N --device cpu|cuda]

Builds our model from a ``TransformerConfig`` (``--preset``: the benchmark's own "small" CPU size, or any
``TransformerConfig`` preset name) and ``transformers.LlamaForCausalLM`` from the equivalent ``LlamaConfig`` (same
vocab, layers, width, heads, kv heads, intermediate size, tying, RoPE base; attn_implementation="sdpa"), copies our
initial weights into the HF model (so both start from the same point; the first losses are printed side by side), and
times one training step = forward + next-token cross-entropy (computed the same way, outside the model, for both) +
backward + ``torch.optim.AdamW.step`` + ``zero_grad``. Both models live in ``--dtype`` (parameters and optimiser
state), in train mode, on the same random batch of ``--batch`` × ``--seq`` tokens.

Steps alternate between the two models (ours, HF, ours, HF, ...) so that load changes on a shared machine hit both
alike; tokens/s = batch × seq / median step time over ``--steps`` steps after ``--warmup`` steps (with ``--compile``
the warm-up also covers compilation). A third row, "ours compiled", is our model with ``torch.compile`` applied per
block exactly as the stages do with ``model.compile: true`` (``distributed.apply_compile``), from the same initial
weights; its first step (compilation included) is printed beside the table (``--no-compiled-row`` drops it). On CUDA, MFU = (6·N + 12·n_layer·n_embd·seq) FLOPs per token × tokens/s /
peak FLOPs of the device and dtype (``lightning.fabric.utilities.throughput.get_available_flops``); N counts the
parameters that take part in matmuls (all but the input embedding; a tied head counts once), the second term is
PaLM's attention estimate (scores and weighted sum, forward + backward, without halving for causality).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
import transformers
from torch import Tensor, nn

from common import SMALL_LM, machine_line
from lit_keomni.layouts.hf_lm import to_hf
from lit_keomni.configs import TransformerConfig
from lit_keomni.distributed import apply_compile
from lit_keomni.nn.transformer import Transformer

PRESETS = {"small": SMALL_LM}


def hf_config(c: TransformerConfig) -> transformers.LlamaConfig:
    if c.bias or c.rotary_dim_fraction != 1.0 or not c.causal:
        raise SystemExit("HF Llama has no qkv bias, partial rotary or bidirectional option: pick a Llama-shaped preset")
    rope = dict(rope_type="default", rope_theta=c.rope_base, **(c.rope_scaling or {}))
    return transformers.LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.n_embd, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.n_layer, num_attention_heads=c.n_head, num_key_value_heads=c.n_kv_head,
        head_dim=c.head_dim, max_position_embeddings=c.block_size, rms_norm_eps=c.norm_eps,
        tie_word_embeddings=c.tie_embeddings, rope_theta=c.rope_base, rope_parameters=rope,
        rope_scaling=dict(c.rope_scaling) if c.rope_scaling else None,
        attention_bias=False, mlp_bias=False, attention_dropout=0.0, attn_implementation="sdpa",
    )


def matmul_params(model: nn.Module, embedding: nn.Module) -> int:
    """Parameters used in matmuls: all unique parameters but the input embedding (a tied head counts once)."""
    params = {id(p): p for p in model.parameters()}
    head_tied = any(p is embedding.weight for n, p in model.named_parameters(remove_duplicate=False) if "head" in n)
    if not head_tied:
        params.pop(id(embedding.weight))
    return sum(p.numel() for p in params.values())


def train_step(model: nn.Module, opt: torch.optim.Optimizer, logits_of: Callable[[Tensor], Tensor],
               x: Tensor, y: Tensor, vocab: int) -> Callable[[], float]:
    def step() -> float:
        logits = logits_of(x)[..., :vocab]  # ours pads the head to a multiple of 64 rows: score the real vocab only
        loss = F.cross_entropy(logits.reshape(-1, vocab).float(), y.reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()
    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="small", help=f"one of {sorted(PRESETS)} or a TransformerConfig preset")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--compile", action="store_true", help="torch.compile both models (whole model)")
    p.add_argument("--no-compiled-row", dest="compiled_row", action="store_false",
                   help="skip the 'ours compiled' row (per-block compile, as model.compile: true)")
    p.add_argument("--tied", action="store_true", help="tie input embedding and output head (both models)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    device, dtype = torch.device(a.device), getattr(torch, a.dtype)

    overrides = dict(block_size=max(a.seq, 256))
    if a.tied:
        overrides["tie_embeddings"] = True
    if a.preset in PRESETS:
        cfg = TransformerConfig.from_dict({**PRESETS[a.preset], **overrides})
    else:
        cfg = TransformerConfig.from_name(a.preset, **overrides)
    if a.seq > cfg.block_size:
        p.error(f"--seq {a.seq} exceeds block_size {cfg.block_size}")

    ours = Transformer(cfg)
    hf = transformers.LlamaForCausalLM(hf_config(cfg))
    missing, unexpected = hf.load_state_dict(to_hf(ours.state_dict(), cfg, "llama"), strict=False)
    if unexpected or [k for k in missing if not (cfg.tie_embeddings and k == "lm_head.weight")]:
        raise SystemExit(f"weight copy into HF failed: missing {missing}, unexpected {unexpected}")
    if cfg.tie_embeddings:
        hf.tie_weights()
    ours.to(device=device, dtype=dtype).train()
    hf.to(device=device, dtype=dtype).train()
    models = [("ours", ours), ("HF", hf)]
    if a.compiled_row:
        compiled = copy.deepcopy(ours)
        apply_compile(compiled.blocks)
        models.append(("ours compiled", compiled))
    n_ours, n_hf = (sum(t.numel() for t in m.parameters()) for m in (ours, hf))
    n_mm = matmul_params(ours, ours.embed)

    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, cfg.vocab_size, (a.batch, a.seq + 1), generator=g).to(device)
    x, y = data[:, :-1], data[:, 1:]

    def ours_logits(m: nn.Module) -> Callable[[Tensor], Tensor]:
        return lambda t: m(t)

    def hf_logits(m: nn.Module) -> Callable[[Tensor], Tensor]:
        return lambda t: m(input_ids=t, use_cache=False).logits

    runs = []
    for _, model in models:
        fwd = torch.compile(model) if a.compile else model
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
        logits_of = hf_logits(fwd) if model is hf else ours_logits(fwd)
        runs.append(train_step(model, opt, logits_of, x, y, cfg.vocab_size))

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times: list[list[float]] = [[] for _ in runs]
    losses: list[list[float]] = [[] for _ in runs]
    first: list[float] = [0.0 for _ in runs]
    for r in range(a.warmup + a.steps):
        for i, step in enumerate(runs):
            sync()
            t0 = time.perf_counter()
            loss = step()
            sync()
            if r >= a.warmup:
                times[i].append(time.perf_counter() - t0)
            elif r == 0:
                first[i] = time.perf_counter() - t0
            if r < 2:
                losses[i].append(float(loss))
    medians = [statistics.median(t) for t in times]
    t_ours, t_hf = medians[:2]
    tokens = a.batch * a.seq

    print(machine_line(device))
    print(f"config {a.preset!r}: vocab={cfg.vocab_size} (ours padded to {cfg.padded_vocab_size}) layers={cfg.n_layer} "
          f"n_embd={cfg.n_embd} heads={cfg.n_head} kv_heads={cfg.n_kv_head} intermediate={cfg.intermediate_size} "
          f"tied={cfg.tie_embeddings}; params ours {n_ours / 1e6:.2f} M, HF {n_hf / 1e6:.2f} M")
    print(f"step = forward + cross-entropy + backward + AdamW; batch {a.batch} × seq {a.seq} = {tokens} tokens, "
          f"{a.dtype}, compile={a.compile}, median of {a.steps} alternating steps after {a.warmup} warm-up")
    print("loss at steps 1, 2 (same initial weights): "
          + "; ".join(f"{name} {ls[0]:.4f}, {ls[1]:.4f}" for (name, _), ls in zip(models, losses)) + "\n")
    mfu_head = ""
    peak = None
    if device.type == "cuda":
        from lightning.fabric.utilities.throughput import get_available_flops

        peak = get_available_flops(device, dtype)
        mfu_head = f"{'MFU':>8}"
    flops_per_token = 6 * n_mm + 12 * cfg.n_layer * cfg.n_embd * a.seq
    print(f"{'model':<15}{'step ms':>10}{'tokens/s':>12}{mfu_head}")
    for (name, _), t in zip(models, medians):
        mfu = f"{flops_per_token * tokens / t / peak:>8.1%}" if peak else ""
        print(f"{name:<15}{t * 1e3:>10.1f}{tokens / t:>12.0f}{mfu}")
    print(f"\nours/HF tokens/s: {t_hf / t_ours:.2f}×")
    if a.compiled_row:
        print(f"ours compiled/ours tokens/s: {t_ours / medians[2]:.2f}× (first step, compilation included: "
              f"{first[2]:.1f} s; eager first step {first[0]:.2f} s)")


if __name__ == "__main__":
    main()
