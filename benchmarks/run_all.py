"""Run every side-by-side benchmark in a fresh process and write ``benchmarks/RESULTS.md``: the machine, the library
versions, and each script's printed table (ours, the reference, their ratio) verbatim.

    python benchmarks/run_all.py                    # default sizes of every script
    python benchmarks/run_all.py --only generate    # a subset
    python benchmarks/run_all.py --with-load        # also the tokenize/interleave load benchmark (long)
    python benchmarks/run_all.py --only data memory --update   # rerun these, keep the other sections of RESULTS.md
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from lit_keomni.atomic import write_text  # noqa: E402

SCRIPTS = {
    "tokenizer": ("stage-1 encoder: speech tokens × real time vs transformers' Whisper encoder", []),
    "lm_train": ("LM training step: tokens/s vs transformers.LlamaForCausalLM", []),
    "generate": ("KV-cache generation: tokens/s vs transformers generate()", []),
    "interleave": ("interleave: speech tokens/s of the stage-2 export vs the paper's 25k tok/s (1.5B, H800, SGLang)", []),
    "chat_latency": ("chat: time to first audio per component vs the < 200 ms goal (tiny exports, CPU)", []),
    "data": ("stage-1 data loading: litdata chunks vs a naive per-item JSON + wav loader, samples/s", []),
    "memory": ("peak training memory per stage: tiny recipes measured, paper recipes estimated (FSDP2)", []),
    "vocoder": ("unit HiFi-GAN: real-time factor, whole vs real time and streaming vs whole", []),
    "load": ("tokenize / interleave at growing sizes: items/s, peak RSS, SIGKILL + resume", ["--sizes", "500", "2000"]),
}


def _sections(path: Path) -> dict[str, list[str]]:
    """The ``## name — …`` sections of an earlier RESULTS.md, by benchmark name (empty if there is none)."""
    if not path.is_file():
        return {}
    out: dict[str, list[str]] = {}
    name = None
    for line in path.read_text(encoding="utf-8").splitlines():
        m = re.match(r"## (\w+) — ", line)
        if m:
            name = m.group(1)
            out[name] = []
        if name is not None:
            out[name].append(line)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", nargs="+", choices=sorted(SCRIPTS), help="run only these benchmarks")
    p.add_argument("--with-load", action="store_true", help="include the (long) load benchmark")
    p.add_argument("--out", default=str(HERE / "RESULTS.md"))
    p.add_argument("--timeout", type=float, default=1800, help="seconds per benchmark")
    p.add_argument("--update", action="store_true",
                   help="keep the sections of --out that are not rerun (with their own dates) instead of dropping them")
    a = p.parse_args()
    names = a.only or [n for n in SCRIPTS if n != "load" or a.with_load]
    import torch

    lines = [
        "# Benchmark results",
        "",
        f"Written by `python benchmarks/run_all.py` on {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC.",
        f"Machine: {platform.node()}, {platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"CUDA: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}; "
        f"Python {platform.python_version()}, torch {torch.__version__}.",
        "Each section is the script's own output: ours and the reference measured side by side in one process.",
        "",
    ]
    if a.update:
        lines[-1:-1] = ["Sections whose run line carries a date were rerun then; the others are kept from earlier runs."]
    sections: dict[str, list[str]] = {}
    failed = []
    for name in names:
        what, args = SCRIPTS[name]
        cmd = [sys.executable, str(HERE / f"{name}.py"), *args]
        print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
        load = os.getloadavg()[0]
        start = time.perf_counter()
        try:
            run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=a.timeout)
            output, rc = run.stdout.strip(), run.returncode
            if rc != 0:
                output += "\n" + run.stderr.strip()[-2000:]
        except subprocess.TimeoutExpired:
            output, rc = f"(stopped after {a.timeout:.0f} s)", -1
        seconds = time.perf_counter() - start
        print(output, flush=True)
        if rc != 0:
            failed.append(name)
        when = f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, " if a.update else ""
        command = f"`python benchmarks/{name}.py {' '.join(args)}`".replace(" `", "`")
        sections[name] = [f"## {name} — {what}", "", command,
                          f"({when}{seconds:.0f} s, exit {rc}; load average {load:.1f} on "
                          f"{os.cpu_count()} CPUs when it started)", "", "```", output, "```", ""]
    kept = _sections(Path(a.out)) if a.update else {}  # read now: another run may have written it meanwhile
    for name in [*SCRIPTS, *(n for n in kept if n not in SCRIPTS)]:  # the script order, whichever ran now
        if name in sections:
            lines += sections[name]
        elif name in kept:
            lines += kept[name]
    write_text(Path(a.out), "\n".join(lines))
    print(f"wrote {a.out}")
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
