"""Synthetic interleaved data: speech tokens generated per second by ``interleave``, beside the paper's figure.

    python benchmarks/interleave.py [--export checkpoints/stage2/export --source data/builtin/text/toy_world.jsonl
                                     --documents 64 --batch-size 256 --threads N --device cpu|cuda]

Runs ``lit_keomni.interleave.interleave_documents`` (span corruption, then batched KV-cache generation of the speech
tokens of every span) with a text-to-token export over the first ``--documents`` documents of a JSONL text corpus,
after one warm-up round on other documents. Without ``--export`` (or when the folder is missing) a randomly initialised
model of the stage-2 CPU recipe's size is used: its spans run to their length limit, so it measures the same work.

Reference: seed 003 §2.3.1 reports 25k speech tokens/s for the 1.5B text-to-token model on one H800 with SGLang.
Both figures are also given as model FLOP/s (2 × parameters per generated token, attention excluded) so that
models of different sizes can be set side by side; the hardware differs, so the ratio says how far a CPU run is from
the paper's throughput, not which implementation is faster (``benchmarks/generate.py`` compares implementations).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import machine_line

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PAPER_TOKENS_PER_S = 25_000.0
PAPER_PARAMS = 1.5e9
STAGE2_RECIPE = {"n_layer": 4, "n_embd": 256, "n_head": 4, "n_kv_head": 2, "intermediate_size": 688, "block_size": 512}


def read_docs(source: Path, n: int, skip: int = 0) -> list[tuple[str, str]]:
    docs = []
    with open(source, encoding="utf-8") as f:
        for k, line in enumerate(f):
            if k < skip:
                continue
            row = json.loads(line)
            docs.append((row["id"], row["text"]))
            if len(docs) == n:
                break
    return docs


def load_model(export: Path | None, tmp: Path):
    from lit_keomni.checkpoints import load_text_to_token

    if export is not None and export.is_dir():
        return (*load_text_to_token(export)[:2], str(export))
    from lit_keomni.stages.text_to_token import TextToToken

    torch.manual_seed(0)
    stage = TextToToken(config="tiny", overrides=STAGE2_RECIPE, speech_export=str(ROOT / "checkpoints/stage1/export"))
    stage.configure_model()
    path = stage.export(tmp / "stage2")
    return (*load_text_to_token(path)[:2], "random init, stage-2 recipe size")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--export", default=str(ROOT / "checkpoints/stage2/export"))
    p.add_argument("--source", default=str(ROOT / "data/builtin/text/toy_world.jsonl"))
    p.add_argument("--documents", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    print(machine_line(device))
    source = Path(a.source)
    if not source.is_file():
        raise SystemExit(f"{source}: text corpus not found (run stage 3's data preparation or pass --source)")
    from lit_keomni.interleave import interleave_documents

    with tempfile.TemporaryDirectory() as tmp:
        model, tokenizer, name = load_model(Path(a.export) if a.export else None, Path(tmp))
    model = model.to(device).eval()
    params = sum(p.numel() for p in model.parameters())
    warm, docs = read_docs(source, 8, skip=a.documents), read_docs(source, a.documents)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.inference_mode():
        interleave_documents(model, tokenizer, warm, batch_size=a.batch_size, generator=gen)
        t0 = time.perf_counter()
        _, counts = interleave_documents(model, tokenizer, docs, batch_size=a.batch_size, generator=gen)
        wall = time.perf_counter() - t0
    ours = counts["speech_tokens"] / counts["generation_seconds"]
    flops = 2 * params
    print(f"model: {name}, {params / 1e6:.2f} M parameters; {counts['documents']} documents, {counts['spans']} spans, "
          f"{counts['speech_tokens']} speech tokens, {counts['spans_at_limit']} spans at their length limit; "
          f"{wall:.1f} s in all, {counts['generation_seconds']:.1f} s generating")
    print()
    print("| figure | ours | paper (1.5B, one H800, SGLang) | ours / paper |")
    print("|---|---|---|---|")
    print(f"| speech tokens/s | {ours:,.0f} | {PAPER_TOKENS_PER_S:,.0f} | {ours / PAPER_TOKENS_PER_S:.4f} |")
    ours_flops, paper_flops = ours * flops, PAPER_TOKENS_PER_S * 2 * PAPER_PARAMS
    print(f"| model TFLOP/s (forward, per generated token) | {ours_flops / 1e12:.4f} | {paper_flops / 1e12:.1f} | "
          f"{ours_flops / paper_flops:.6f} |")


if __name__ == "__main__":
    main()
