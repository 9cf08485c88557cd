"""Batched KV-cache generation speed: our ``lit_keomni.generate.generate`` beside Hugging Face ``generate`` on the
same weights, in one process, with a greedy parity check.

    python benchmarks/generate.py [--preset small --batch 16 --prompt 32 --new 128 --repeats 5 --dtype float32
                                   --threads N --device cpu|cuda]

Builds our ``Transformer`` (``--preset``: the same "small" size as ``benchmarks/lm_train.py``, or any Llama-shaped
``TransformerConfig`` preset), random init at trained-like scales (matrices N(0, 1/fan_in), embedding N(0, 1)) so that
greedy continuations are varied (~100 distinct tokens in 128) rather than one token repeated, exports it with ``lit_keomni.layouts.save_lm_folder`` to a temporary folder and
loads that with ``transformers.LlamaForCausalLM.from_pretrained`` (SDPA attention): one set of weights, two
implementations. Both decode the same batch of ``--batch`` random prompts of ``--prompt`` tokens, greedily, for exactly
``--new`` tokens with the KV cache: ours with no stop ids, HF with ``min_new_tokens = max_new_tokens``, no eos token and
``use_cache=True``. Before timing, the greedy tokens of both must be identical (asserted and printed; in bfloat16
rounding differs between the two implementations, so there a mismatch is only reported).

tokens/s = batch × new tokens / median wall seconds of one whole ``generate`` call (prefill + decode + returning the
tokens) over ``--repeats`` rounds after one warm-up round; rounds alternate ours, HF so that load changes on a shared
machine hit both alike.
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable

import torch
import transformers

from common import SMALL_LM, machine_line
from lit_keomni.layouts import save_lm_folder
from lit_keomni.configs import TransformerConfig
from lit_keomni.generate import generate
from lit_keomni.nn.transformer import Transformer

PRESETS = {"small": SMALL_LM}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="small", help=f"one of {sorted(PRESETS)} or a TransformerConfig preset")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--prompt", type=int, default=32, help="prompt length (all prompts equally long)")
    p.add_argument("--new", type=int, default=128, help="new tokens per prompt (no early stop)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    device, dtype = torch.device(a.device), getattr(torch, a.dtype)

    overrides = dict(block_size=max(a.prompt + a.new, 256))
    if a.preset in PRESETS:
        cfg = TransformerConfig.from_dict({**PRESETS[a.preset], **overrides})
    else:
        cfg = TransformerConfig.from_name(a.preset, **overrides)
    ours = Transformer(cfg).eval()
    with torch.no_grad():  # trained-like scales: varied greedy continuations, not one token repeated
        for w in ours.parameters():
            if w.dim() == 2:
                w.normal_(0.0, 1.0 / math.sqrt(w.shape[1]))
        ours.embed.weight.normal_(0.0, 1.0)
    transformers.utils.logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        save_lm_folder(ours.state_dict(), cfg, tmp, "llama")
        hf = transformers.LlamaForCausalLM.from_pretrained(tmp, attn_implementation="sdpa", dtype=torch.float32)
    ours.to(device=device, dtype=dtype)
    hf.to(device=device, dtype=dtype).eval()

    g = torch.Generator().manual_seed(0)
    prompts_t = torch.randint(0, cfg.vocab_size, (a.batch, a.prompt), generator=g)
    prompts = prompts_t.tolist()
    hf_ids = prompts_t.to(device)
    hf_mask = torch.ones_like(hf_ids)
    pad = cfg.vocab_size - 1  # HF wants a pad id; no padding occurs (equal lengths, no early stop)
    gen_cfg = transformers.GenerationConfig(
        do_sample=False, max_new_tokens=a.new, min_new_tokens=a.new, eos_token_id=None, pad_token_id=pad,
        bos_token_id=None, use_cache=True,
    )

    def run_ours() -> list[list[int]]:
        return generate(ours, prompts, max_new_tokens=a.new, temperature=0.0)

    def run_hf() -> list[list[int]]:
        with torch.inference_mode():
            out = hf.generate(input_ids=hf_ids, attention_mask=hf_mask, generation_config=gen_cfg)
        return out[:, a.prompt:].tolist()

    got_ours, got_hf = run_ours(), run_hf()
    assert all(len(r) == a.new for r in got_ours) and all(len(r) == a.new for r in got_hf), "early stop happened"
    same_rows = sum(o == h for o, h in zip(got_ours, got_hf))
    same_tokens = sum(x == y for o, h in zip(got_ours, got_hf) for x, y in zip(o, h))
    distinct = statistics.median(len(set(r)) for r in got_ours)
    parity = (f"greedy parity: {same_rows}/{a.batch} rows, {same_tokens}/{a.batch * a.new} tokens identical; "
              f"median {distinct:g} distinct tokens per row; row 0 starts {got_ours[0][:6]} ours, {got_hf[0][:6]} HF")
    if dtype == torch.float32:
        assert got_ours == got_hf, parity

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fns: list[Callable[[], object]] = [run_ours, run_hf]
    times: list[list[float]] = [[], []]
    for r in range(1 + a.repeats):
        for fn, ts in zip(fns, times):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            if r >= 1:
                ts.append(time.perf_counter() - t0)
    t_ours, t_hf = (statistics.median(t) for t in times)
    tokens = a.batch * a.new

    print(machine_line(device))
    print(f"config {a.preset!r}: vocab={cfg.vocab_size} layers={cfg.n_layer} n_embd={cfg.n_embd} heads={cfg.n_head} "
          f"kv_heads={cfg.n_kv_head} intermediate={cfg.intermediate_size} tied={cfg.tie_embeddings}; "
          f"{sum(t.numel() for t in ours.parameters()) / 1e6:.2f} M params, {a.dtype}")
    print(f"{a.batch} prompts × {a.prompt} tokens, greedy, exactly {a.new} new tokens each, KV cache; "
          f"median of {a.repeats} alternating rounds after 1 warm-up")
    print(parity + "\n")
    print(f"{'model':<8}{'wall ms':>10}{'tokens/s':>12}{'ms/token step':>15}")
    for name, t in (("ours", t_ours), ("HF", t_hf)):
        print(f"{name:<8}{t * 1e3:>10.1f}{tokens / t:>12.0f}{t * 1e3 / a.new:>15.2f}")
    print(f"\nours/HF tokens/s: {t_hf / t_ours:.2f}×")


if __name__ == "__main__":
    main()
