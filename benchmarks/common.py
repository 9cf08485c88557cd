"""What the benchmark scripts share: the CPU name printed above each table, the load average, the small LM preset and
the median timer."""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable

import torch
from typing import Any


SMALL_LM: dict[str, Any] = dict(vocab_size=2048, n_layer=4, n_embd=256, n_head=4, n_kv_head=2, intermediate_size=688,
                                block_size=1024)
"""A CPU-sized ``TransformerConfig`` ("small") used by the LM benchmarks."""


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_line(device: torch.device) -> str:
    """Device, torch threads and library versions: the first line of every benchmark's output."""
    import transformers

    hw = (f"GPU: {torch.cuda.get_device_name(device)}" if device.type == "cuda"
          else f"CPU: {cpu_model()}  |  torch threads: {torch.get_num_threads()}")
    return f"{hw}  |  torch {torch.__version__}, transformers {transformers.__version__}"


def load_line() -> str:
    """The 1-minute load average, printed beside every figure (a figure taken on a busy machine is not one)."""
    import os

    return f"load average {os.getloadavg()[0]:.2f}"


def timed(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    """Median wall seconds of ``repeats`` calls of ``fn`` after one warm-up call (CUDA synchronised around each)."""
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)
