"""Run every side-by-side benchmark in a fresh process and write ``benchmarks/RESULTS.md``: the machine, the library
versions, and each script's printed table (ours, the reference, their ratio) verbatim.

    python benchmarks/run_all.py                    # default sizes of every script
    python benchmarks/run_all.py --only generate    # a subset
    python benchmarks/run_all.py --with-load        # also the tokenize/interleave load benchmark (long)
"""

from __future__ import annotations

import argparse
import datetime
import platform
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
    "load": ("tokenize / interleave at growing sizes: items/s, peak RSS, SIGKILL + resume", ["--sizes", "500", "2000"]),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", nargs="+", choices=sorted(SCRIPTS), help="run only these benchmarks")
    p.add_argument("--with-load", action="store_true", help="include the (long) load benchmark")
    p.add_argument("--out", default=str(HERE / "RESULTS.md"))
    p.add_argument("--timeout", type=float, default=1800, help="seconds per benchmark")
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
    failed = []
    for name in names:
        what, args = SCRIPTS[name]
        cmd = [sys.executable, str(HERE / f"{name}.py"), *args]
        print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
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
        lines += [f"## {name} — {what}", "", f"`python benchmarks/{name}.py {' '.join(args)}`".replace(" `", "`"),
                  f"({seconds:.0f} s, exit {rc})", "", "```", output, "```", ""]
    write_text(Path(a.out), "\n".join(lines))
    print(f"wrote {a.out}")
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
