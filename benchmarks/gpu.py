"""The GPU suite: the seeds' model sizes with random weights built on the device (no weights travel), in one call.

    python benchmarks/gpu.py [--out DIR] [--only lm_mfu lora_sft ...]      # on a CUDA machine, ≤ 9 minutes
    python benchmarks/gpu.py --tiny                                          # the same code on CPU with tiny sizes

Each section runs our own modules the way the stages run them and prints its figures beside a reference:
- ``lm_mfu``: text-to-token 1.5B (seed 003 Table 12) training steps, bf16 (FSDP2 mixed precision on one GPU,
  ``distributed.apply_fsdp``), ``torch.compile`` of the blocks; tokens/s and MFU (``lm.flops_per_token`` against the
  device's peak bf16 FLOPs). Reference: torchtitan's published 33-39 % MFU for Llama-3-8B on H100; goal >= 50 %.
- ``stage1``: the speech tokenizer at whisper-large-v3 size (12.5 Hz, 16,384 codes) on 30 s clips, bf16 autocast:
  step time and audio seconds per second, beside the log-mel front end's audio seconds per second on the device
  (the loader only decodes and pads; the features are made on the GPU).
- ``lora_sft``: glm-4-voice-9b (168,960 rows) and Llama-3.1-8B SFT with LoRA (rank 64, bf16 base, activation
  checkpointing through FSDP2 on one GPU, chunked loss), one 4,096-token row per step: peak memory and tokens/s.
  Reference: the single-GPU LoRA budgets of moshi-finetune / LLaMA-Omni 2 (80 GB class GPUs).
- ``interleave``: speech tokens/s of batched KV-cache sampling with the 1.5B model (``generate.generate``).
  Reference: the seed's 25k tokens/s.
- ``chat``: first audio of the GLM-4-Voice pipeline at paper size, by parts: speech tokenizer encoder (16 layers up to
  the VQ) on a 3 s question, 9B prefill + 13 text and 10 speech tokens, the unit vocoder on those tokens. Reference:
  < 150 ms (CosyVoice 2).
Writes ``gpu.json`` and ``gpu.md`` (one table) into ``--out``; a section that fails prints its error and the others run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine_line  # noqa: E402
from lit_keomni.configs import SpeechTokenizerConfig, TransformerConfig  # noqa: E402
from lit_keomni.nn.transformer import Transformer  # noqa: E402

TINY_LM = dict(n_layer=2, n_embd=64, n_head=4, n_kv_head=2, intermediate_size=172, block_size=512)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device, warmup: int, steps: int) -> float:
    """Seconds per call of ``fn`` after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / max(1, steps)


def mesh(device: torch.device):
    """A one-process data-parallel mesh (what ``ModelParallelStrategy`` gives each stage), for ``apply_fsdp``."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29533")
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    return init_device_mesh(device.type, (1,))


def build_lm(config: TransformerConfig, device: torch.device, lora: dict | None = None) -> Transformer:
    """Random weights made on the device (the meta-device model materialised there, then initialised)."""
    from lit_keomni.nn.lora import LoRAConfig, LoRALinear, apply_lora

    with torch.device("meta"):
        model = Transformer(config)
        if lora:
            apply_lora(model, LoRAConfig.from_dict(lora))
            if lora.get("base_dtype"):  # every frozen weight in the base dtype before any memory is taken
                for p in model.parameters():
                    if not p.requires_grad:
                        p.data = p.data.to(getattr(torch, lora["base_dtype"]))
    model.to_empty(device=device)
    model.reset_parameters()
    for m in model.modules():
        if isinstance(m, LoRALinear):
            m.reset_lora()
    return model


def peak_flops(device: torch.device) -> float | None:
    from lightning.fabric.utilities.throughput import get_available_flops

    return get_available_flops(device, "bf16-true") if device.type == "cuda" else None


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, ids: torch.Tensor, device: torch.device,
               loss_chunk: int = 0) -> None:
    with torch.autocast(device.type, dtype=torch.bfloat16):
        losses, _ = model(ids[:, :-1], targets=ids[:, 1:], loss_chunk=loss_chunk)
    losses.mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


# ---------------------------------------------------------------------------------------------------- sections


def lm_mfu(device: torch.device, tiny: bool, compile: bool) -> dict[str, Any]:
    from lit_keomni.distributed import apply_fsdp
    from lit_keomni.lm import flops_per_token

    config = (TransformerConfig.from_name("tiny", **TINY_LM) if tiny else
              TransformerConfig.from_name("text-to-token-1.5b").replace(vocab_size=59264 + 16384 + 8, block_size=2048))
    b, t = (2, 64) if tiny else (8, 2048)
    model = build_lm(config, device)
    apply_fsdp(model, mesh(device), blocks=model.blocks, param_dtype=torch.bfloat16, compile=compile)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    ids = torch.randint(0, config.vocab_size, (b, t + 1), device=device)
    dt = timed(lambda: train_step(model, opt, ids, device), device, warmup=3, steps=3 if tiny else 10)
    tps = b * t / dt
    peak = peak_flops(device)
    out = {"model": "text-to-token 1.5B" if not tiny else "tiny", "params": sum(p.numel() for p in model.parameters()),
           "batch": f"{b}x{t}", "step_s": dt, "tokens_per_s": tps,
           "mfu": flops_per_token(model, t) * tps / peak if peak else None, "reference": "torchtitan 33-39 % (8B, H100); goal >= 50 %"}
    del model, opt
    return out


def stage1(device: torch.device, tiny: bool, compile: bool) -> dict[str, Any]:
    import torch.nn.functional as F

    from lit_keomni.nn.audio import LogMel
    from lit_keomni.nn.whisper import SpeechTokenizerModel

    config = SpeechTokenizerConfig.from_name("tiny" if tiny else "whisper-large-v3-12.5hz", vocab_size=51866)
    seconds, b = (4, 2) if tiny else (30, 8)
    model = SpeechTokenizerModel(config).to(device)
    model.encoder.quantizer.init_codebook(torch.randn_like(model.encoder.quantizer.codebook))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=device.type == "cuda")
    logmel = LogMel(n_mels=config.n_mels).to(device)
    wav = torch.randn(b, seconds * 16000, device=device) * 0.1
    lengths = torch.full((b,), seconds * 16000, device=device)
    tokens = torch.randint(0, config.vocab_size, (b, 65), device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            mel, mel_lengths = logmel(wav, lengths)
            logits, enc = model(mel, mel_lengths, tokens[:, :-1])
            loss = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten()) + enc.vq.commitment_loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    dt = timed(step, device, warmup=2, steps=2 if tiny else 6)
    mel_dt = timed(lambda: logmel(wav, lengths), device, warmup=2, steps=5)
    out = {"model": "whisper-large-v3 12.5 Hz" if not tiny else "tiny", "batch": f"{b}x{seconds}s", "step_s": dt,
           "audio_s_per_s": b * seconds / dt, "logmel_audio_s_per_s": b * seconds / mel_dt,
           "reference": "the front end must exceed the step's audio rate"}
    del model, opt
    return out


def lora_sft(device: torch.device, tiny: bool, compile: bool) -> list[dict[str, Any]]:
    from lit_keomni.distributed import apply_fsdp
    from lit_keomni.nn.lora import parameter_counts

    lora = {"rank": 64 if not tiny else 4, "alpha": 128, "base_dtype": "bfloat16"}
    models = ([("tiny", TransformerConfig.from_name("tiny", **TINY_LM))] if tiny else
              [("glm-4-voice-9b", TransformerConfig.from_name("glm-4-voice-9b").replace(vocab_size=168960)),
               ("llama-3.1-8b", TransformerConfig.from_name("llama-3.1-8b").replace(vocab_size=128256 + 6,
                                                                                   block_size=8192))])
    t = 64 if tiny else 4096
    rows = []
    for name, config in models:
        if device.type == "cuda":
            torch.cuda.empty_cache()
        model = build_lm(config.replace(block_size=max(config.block_size, t)), device, lora)
        apply_fsdp(model, mesh(device), blocks=model.blocks, param_dtype=torch.bfloat16, activation_checkpointing=True,
                   compile=compile)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
        ids = torch.randint(0, config.vocab_size, (1, t + 1), device=device)
        dt = timed(lambda: train_step(model, opt, ids, device, loss_chunk=1024), device, warmup=2,
                   steps=2 if tiny else 5)
        trainable, total = parameter_counts(model)
        rows.append({"model": name, "trainable": trainable, "params": total, "batch": f"1x{t}", "step_s": dt,
                     "tokens_per_s": t / dt,
                     "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
                     "reference": "fits one 80 GB GPU"})
        del model, opt
    return rows


def interleave(device: torch.device, tiny: bool, compile: bool) -> dict[str, Any]:
    from lit_keomni.generate import generate

    config = (TransformerConfig.from_name("tiny", **TINY_LM) if tiny else
              TransformerConfig.from_name("text-to-token-1.5b").replace(vocab_size=59264 + 16384 + 8, block_size=1024))
    model = build_lm(config, device).to(torch.bfloat16).eval()
    b, prompt, new = (4, 16, 8) if tiny else (256, 64, 256)
    lo = config.vocab_size - 16384 - 8 if not tiny else 0
    prompts = torch.randint(0, config.vocab_size, (b, prompt)).tolist()
    gen = torch.Generator(device=device).manual_seed(0)

    def run() -> None:
        with torch.no_grad():
            generate(model, prompts, max_new_tokens=new, temperature=1.0, generator=gen,
                     allowed_ids=(lo, config.vocab_size))

    dt = timed(run, device, warmup=1, steps=1 if tiny else 2)
    out = {"model": "text-to-token 1.5B" if not tiny else "tiny", "batch": f"{b} rows x {new} new",
           "speech_tokens_per_s": b * new / dt, "reference": "seed 003: 25k tokens/s"}
    del model
    return out


def chat(device: torch.device, tiny: bool, compile: bool) -> dict[str, Any]:
    from lit_keomni.generate import generate
    from lit_keomni.nn.audio import LogMel
    from lit_keomni.nn.hifigan import UnitVocoder, VocoderConfig
    from lit_keomni.nn.whisper import SpeechTokenizerModel

    s1 = SpeechTokenizerConfig.from_name("tiny" if tiny else "whisper-large-v3-12.5hz", vocab_size=51866)
    tokenizer = SpeechTokenizerModel(s1).to(device).to(torch.bfloat16).eval()
    logmel = LogMel(n_mels=s1.n_mels).to(device)
    lm_config = (TransformerConfig.from_name("tiny", **TINY_LM) if tiny else
                 TransformerConfig.from_name("glm-4-voice-9b").replace(vocab_size=168960))
    lm = build_lm(lm_config, device).to(torch.bfloat16).eval()
    vocoder = UnitVocoder(s1.codebook_size, VocoderConfig.from_name("tiny" if tiny else "v1")).to(device).eval()
    wav = torch.randn(1, 3 * 16000, device=device) * 0.1
    prompt = torch.randint(0, lm_config.vocab_size, (1, 60)).tolist()
    parts: dict[str, float] = {}

    def run() -> None:
        with torch.no_grad():
            t0 = time.perf_counter()
            mel, lengths = logmel(wav, torch.tensor([wav.shape[1]], device=device))
            tokenizer.encode_tokens(mel.to(torch.bfloat16), lengths)
            sync(device)
            t1 = time.perf_counter()
            units = generate(lm, prompt, max_new_tokens=23, temperature=0.0)[0][-10:]
            sync(device)
            t2 = time.perf_counter()
            vocoder(torch.tensor([[u % s1.codebook_size for u in units]], device=device))
            sync(device)
            t3 = time.perf_counter()
            parts.update(tokenizer_ms=1e3 * (t1 - t0), lm_first_block_ms=1e3 * (t2 - t1), vocoder_ms=1e3 * (t3 - t2))

    timed(run, device, warmup=1, steps=1)
    out = {"model": "glm-4-voice-9b + tokenizer + unit vocoder" if not tiny else "tiny", **parts,
           "first_audio_ms": sum(parts.values()), "reference": "< 150 ms (CosyVoice 2)"}
    del lm, tokenizer, vocoder
    return out


SECTIONS: dict[str, Callable[[torch.device, bool, bool], Any]] = {
    "lm_mfu": lm_mfu, "stage1": stage1, "lora_sft": lora_sft, "interleave": interleave, "chat": chat}


def markdown(results: dict[str, Any], header: str) -> str:
    lines = [f"{header}", "", "| section | model | figures | reference |", "|---|---|---|---|"]
    for name, value in results.items():
        for row in value if isinstance(value, list) else [value]:
            if "error" in row:
                lines.append(f"| {name} | – | error: {row['error']} | |")
                continue
            figures = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()
                                if k not in ("model", "reference") and v is not None)
            lines.append(f"| {name} | {row.get('model', '')} | {figures} | {row.get('reference', '')} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny sizes on CPU (the CI check of this script)")
    p.add_argument("--only", nargs="+", choices=sorted(SECTIONS), default=list(SECTIONS))
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile (always skipped with --tiny)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "gpu_results"))
    a = p.parse_args()
    device = torch.device("cpu" if a.tiny or not torch.cuda.is_available() else "cuda")
    if device.type == "cpu" and not a.tiny:
        sys.exit("error: no CUDA device; run with --tiny for the CPU check")
    compile = not (a.tiny or a.no_compile)
    header = f"{machine_line(device)}  |  compile {compile}"
    print(header)
    results: dict[str, Any] = {}
    for name in a.only:
        t0 = time.perf_counter()
        try:
            results[name] = SECTIONS[name](device, a.tiny, compile)
        except Exception as e:  # one failing section must not cost the others their figures
            traceback.print_exc()
            results[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}
        print(f"{name} ({time.perf_counter() - t0:.0f} s): {json.dumps(results[name], default=str)}", flush=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu.json").write_text(json.dumps({"machine": header, "results": results}, indent=2, default=str))
    (out / "gpu.md").write_text(markdown(results, header))
    print(markdown(results, header))


if __name__ == "__main__":
    main()
