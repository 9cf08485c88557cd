"""Load test of the data commands: ``tokenize`` and ``interleave`` at growing corpus sizes, with peak memory and resume.

    python benchmarks/load.py [--sizes 1000 10000 --workdir DIR --shard-size 500 --batch-size 256 --no-resume]

Offline, in ``--workdir`` (default: a temp folder, removed at the end):
  1. inputs: a toy-world text corpus of N documents (``write_text_corpus``) per size, and a prepared utterance corpus
     (``datamodules.streaming.prepare``) of at least about N utterances (~3.7 per dialogue). One toy world has a limited
     number of unique sentences (``plan_texts`` raises beyond ~1,800 dialogues at seed 1234, ~1,500 at seed 1235), so
     the dialogues are built as several worlds of at most ``--max-dialogues`` each (``build_corpus`` with seeds 1234,
     1235, ...) and merged into one Ke-SpeechChat folder (``merge_corpora``: dialogue ids prefixed per seed, wav
     folders symlinked); the table shows the real item counts.
  2. tiny random exports, built and exported directly (no training): stage 1 (``SpeechTokenizer``, VQ on, random
     codebook) and stage 2 (``TextToToken`` on that stage-1 export).
  3. ``python -m lit_keomni tokenize`` and ``python -m lit_keomni interleave`` as fresh subprocesses per size; wall
     time, items/s, and two memory figures: the peak summed RSS of the process tree (sampled from /proc every 0.1 s)
     and the largest single-process max RSS (``wait4`` rusage, which covers the waited-for descendants).
     Then the ratio of peaks, largest size over smallest: bounded memory keeps it near 1.
  4. resume (largest size): the interleave run with at least four shards is SIGKILLed once its first shard is complete and
     started again; it must finish, report ``shards_reused > 0`` and hold N chunks. The tokenize run is killed while
     its train split is being written and started again; its counts must equal the prepared counts.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from common import machine_line

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

UTTERANCES_PER_DIALOGUE = 3.6
STAGE1_TINY = dict(d_model=64, n_head=4, ffn_dim=128, encoder_layers=2, vq_position=1, decoder_layers=1, codebook_size=16)
STAGE2_TINY = {"n_layer": 2, "n_embd": 64, "n_head": 4, "n_kv_head": 2, "intermediate_size": 172, "block_size": 512}


# ---------------------------------------------------------------------------------------------------- inputs


def build_exports(prepared: Path, out: Path) -> tuple[Path, Path]:
    """Stage-1 and stage-2 exports of tiny, randomly initialised models (VQ on, random codebook)."""
    from lit_keomni.stages.text_to_token import TextToToken
    from lit_keomni.stages.tokenizer import SpeechTokenizer

    torch.manual_seed(0)
    s1 = SpeechTokenizer(config="tiny", overrides=STAGE1_TINY, tokenizer=str(prepared / "tokenizer.json"))
    s1.configure_model()
    enc = s1.model.encoder
    enc.quantizer.init_codebook(torch.randn(STAGE1_TINY["codebook_size"], STAGE1_TINY["d_model"]))
    enc.use_vq = True
    stage1 = s1.export(out / "stage1")
    s2 = TextToToken(config="tiny", overrides=STAGE2_TINY, speech_export=str(stage1))
    s2.configure_model()
    stage2 = s2.export(out / "stage2")
    return Path(stage1), Path(stage2)


def world_sizes(num_dialogues: int, max_per_world: int) -> list[int]:
    """Dialogues per toy world: as few worlds as keep each at most ``max_per_world``, sizes as even as possible."""
    worlds = max(1, math.ceil(num_dialogues / max_per_world))
    return [num_dialogues // worlds + (k < num_dialogues % worlds) for k in range(worlds)]


def merge_corpora(corpora: list[Path], out: Path) -> Path:
    """One Ke-SpeechChat folder ``out`` holding the dialogues of several built corpora (``build_corpus`` outputs).

    A dialogue ``D`` of the corpus built with seed ``S`` becomes ``s<S>-D``: its JSON is rewritten to ``out/s<S>-D.json``
    with that id and audio paths ``s<S>-D/<wav name>``, and ``out/s<S>-D`` is a symlink to the corpus's wav folder ``D``
    (nothing is copied). ``out/corpus.json`` (skipped by folder scans) records the parts and the summed counts; it has
    no ``seed``, so ``build_corpus`` never takes the merged folder for one of its own. Built in a temp folder and
    renamed, so an interrupted merge never looks finished; a finished one is reused.
    """
    from datamodules.corpus import CORPUS_VERSION
    from datamodules.kespeechchat import STAMP_NAME, write_dialogue
    from lit_keomni.atomic import staged_dir, write_json

    stamps = [json.loads((c / STAMP_NAME).read_text(encoding="utf-8")) for c in corpora]
    seeds = [st["seed"] for st in stamps]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"merge_corpora: seeds {seeds} repeat; each part needs its own seed (its id prefix)")
    if len({st["sample_rate"] for st in stamps}) != 1:
        raise ValueError(f"merge_corpora: sample rates differ: {[st['sample_rate'] for st in stamps]}")
    summary = {
        "version": CORPUS_VERSION,
        "merged_from": [{"path": str(c.resolve()), "seed": st["seed"], "num_dialogues": st["num_dialogues"],
                         "prefix": f"s{st['seed']}-"} for c, st in zip(corpora, stamps)],
        "num_dialogues": sum(st["num_dialogues"] for st in stamps),
        "sample_rate": stamps[0]["sample_rate"],
        "utterances": sum(st["utterances"] for st in stamps),
        "hours": round(sum(st["hours"] for st in stamps), 4),
        "languages": {lang: sum(st["languages"][lang] for st in stamps) for lang in ("en", "zh")},
    }
    stamp_path = out / STAMP_NAME
    if stamp_path.is_file() and json.loads(stamp_path.read_text(encoding="utf-8")) == summary:
        return out
    with staged_dir(out) as tmp:
        for corpus, st in zip(corpora, stamps):
            prefix = f"s{st['seed']}-"
            for path in sorted(corpus.glob("*.json")):
                if path.name == STAMP_NAME:
                    continue
                d = json.loads(path.read_text(encoding="utf-8"))
                did = d["id"]
                d["id"] = prefix + did
                for turn in d["dialog"]:
                    folder, _, name = turn["audio_path"].partition("/")
                    if folder != did or not name:
                        raise ValueError(f"{path}: dialogue {did!r} audio_path {turn['audio_path']!r} is not in its "
                                         f"own folder {did}/")
                    turn["audio_path"] = f"{prefix}{did}/{name}"
                (tmp / f"{prefix}{did}").symlink_to((corpus / did).resolve(), target_is_directory=True)
                write_dialogue(d, tmp / f"{prefix}{did}.json")
        write_json(tmp / STAMP_NAME, summary)
    return out


def build_utterance_source(work: Path, num_dialogues: int, max_per_world: int) -> Path:
    """A Ke-SpeechChat folder of ``num_dialogues`` toy-world dialogues: one built corpus, or several toy worlds
    (seeds 1234, 1235, ...; at most ``max_per_world`` dialogues each) merged. Built corpora are reused."""
    from datamodules.corpus import build_corpus

    sizes = world_sizes(num_dialogues, max_per_world)
    corpora = []
    for k, n in enumerate(sizes):
        t0 = time.perf_counter()
        path = work / "worlds" / f"seed{1234 + k}-{n}"
        fresh = not path.is_dir()
        corpora.append(build_corpus(path, num_dialogues=n, seed=1234 + k, workers=os.cpu_count() or 1, progress=False))
        if fresh:
            print(f"built toy world seed {1234 + k}: {n} dialogues in {time.perf_counter() - t0:.0f} s", flush=True)
    if len(corpora) == 1:
        return corpora[0]
    return merge_corpora(corpora, work / "sources" / f"merged-{'+'.join(map(str, sizes))}")


def prepare_utterances(out: Path, source: Path) -> dict[str, int]:
    """Prepared corpus of the dialogues in ``source`` in ``out`` (reused when already there)."""
    from datamodules.streaming import prepare

    stamp = out / "prepared.json"
    if stamp.is_file() and json.loads(stamp.read_text())["source"] == str(source):
        return json.loads(stamp.read_text())["utterances"]
    t0 = time.perf_counter()
    s = prepare(out, source, workers=os.cpu_count() or 1, progress=False)
    print(f"prepared {source.name}: {s['utterances']} utterances in {time.perf_counter() - t0:.0f} s", flush=True)
    return s["utterances"]


# ---------------------------------------------------------------------------------------------------- measuring


def _tree_rss(root: int) -> int:
    """Summed resident bytes of ``root`` and all its descendants (from /proc)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid, ppid = int(d), int(fields[1])
        children.setdefault(ppid, []).append(pid)
        rss[pid] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += rss.get(pid, 0)
        todo.extend(children.get(pid, []))
    return total


def run_measured(cmd: list[str], log: Path, kill_when: Callable[[], bool] | None = None) -> dict[str, Any]:
    """Run ``cmd`` in its own session; wall s, peak tree RSS (MB), max single-process RSS (MB), return code.
    With ``kill_when``, the whole process group is SIGKILLed as soon as it returns True."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    t0 = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env, start_new_session=True)
        peak, killed = 0, False
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            peak = max(peak, _tree_rss(proc.pid))
            if kill_when is not None and not killed and kill_when():
                os.killpg(proc.pid, signal.SIGKILL)
                killed = True
            time.sleep(0.1)
        proc.returncode = os.waitstatus_to_exitcode(status)
    if killed:  # reap what is left of the group (litdata workers) before the next run
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    return {"wall_s": time.perf_counter() - t0, "tree_mb": peak / 2**20, "max_rss_mb": usage.ru_maxrss / 1024,
            "rc": proc.returncode, "killed": killed}


def count_items(chunks: Path) -> int:
    from litdata import StreamingDataset

    return len(StreamingDataset(str(chunks)))


def tokenize_cmd(stage1: Path, data: Path, out: Path, batch_size: int) -> list[str]:
    return [sys.executable, "-m", "lit_keomni", "tokenize", "--export", str(stage1), "--data", str(data),
            "--out", str(out), "--batch-size", str(batch_size)]


def interleave_cmd(stage2: Path, source: Path, out: Path, shard_size: int, batch_size: int) -> list[str]:
    return [sys.executable, "-m", "lit_keomni", "interleave", "--export", str(stage2), "--source", str(source),
            "--out", str(out), "--shard-size", str(shard_size), "--batch-size", str(batch_size)]


# ---------------------------------------------------------------------------------------------------- main


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000], help="corpus sizes; the first is the baseline")
    p.add_argument("--workdir", default=None, help="keep inputs and outputs here (default: a temp folder, removed)")
    p.add_argument("--shard-size", type=int, default=1000, help="interleave documents per shard in the timed runs")
    p.add_argument("--batch-size", type=int, default=256, help="interleave spans per batch")
    p.add_argument("--tokenize-batch", type=int, default=32)
    p.add_argument("--max-dialogues", type=int, default=1400,
                   help="dialogues per toy world (unique-sentence limit ~1,800 at seed 1234, ~1,500 at seed 1235)")
    p.add_argument("--no-resume", action="store_true", help="skip the kill-and-resume checks")
    a = p.parse_args()
    sizes = sorted(set(a.sizes))
    work = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="load-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("DATA_OPTIMIZER_CACHE_FOLDER", str(work / ".litdata" / "chunks"))
    os.environ.setdefault("DATA_OPTIMIZER_DATA_CACHE_FOLDER", str(work / ".litdata" / "data"))
    print(machine_line(torch.device("cpu")), flush=True)
    try:
        run(a, sizes, work)
    finally:
        if not a.workdir:
            shutil.rmtree(work, ignore_errors=True)


def run(a: argparse.Namespace, sizes: list[int], work: Path) -> None:
    from datamodules.toy_world import write_text_corpus

    rows: list[dict[str, Any]] = []
    data: dict[int, tuple[Path, dict[str, int]]] = {}
    for n in sizes:
        dialogues = math.ceil(n / UTTERANCES_PER_DIALOGUE)
        source = build_utterance_source(work, dialogues, a.max_dialogues)
        prepared = work / f"prepared-{source.name}"
        data[n] = (prepared, prepare_utterances(prepared, source))
    stage1, stage2 = build_exports(data[sizes[0]][0], work / "exports")

    for n in sizes:
        src = work / f"text-{n}.jsonl"
        if not src.is_file():
            write_text_corpus(src, num_documents=n)
        prepared, counts = data[n]
        out = work / f"tokens-{n}"
        shutil.rmtree(out, ignore_errors=True)
        r = run_measured(tokenize_cmd(stage1, prepared, out, a.tokenize_batch), work / f"tokenize-{n}.log")
        items = sum(counts.values())
        got = sum(count_items(out / "chunks" / s) for s in counts) if r["rc"] == 0 else -1
        rows.append({"size": n, "command": "tokenize", "items": items, "ok": r["rc"] == 0 and got == items, **r})
        out = work / f"interleaved-{n}"
        shutil.rmtree(out, ignore_errors=True)
        r = run_measured(interleave_cmd(stage2, src, out, a.shard_size, a.batch_size), work / f"interleave-{n}.log")
        got = count_items(out / "chunks") if r["rc"] == 0 else -1
        rows.append({"size": n, "command": "interleave", "items": n, "ok": r["rc"] == 0 and got == n, **r})
        print_rows(rows[-2:], header=n == sizes[0])

    print()
    for cmd in ("tokenize", "interleave"):
        lo, hi = (next(r for r in rows if r["command"] == cmd and r["size"] == s) for s in (sizes[0], sizes[-1]))
        print(f"{cmd}: items x{hi['items'] / lo['items']:.1f}  ->  peak tree RSS x{hi['tree_mb'] / lo['tree_mb']:.2f}, "
              f"max process RSS x{hi['max_rss_mb'] / lo['max_rss_mb']:.2f}")
    if not a.no_resume:
        print()
        resume_checks(a, sizes[-1], work, stage1, stage2, data[sizes[-1]])


def print_rows(rows: list[dict[str, Any]], header: bool) -> None:
    if header:
        print(f"{'size':>6} | {'command':<10} | {'items':>6} | {'wall s':>7} | {'items/s':>8} | {'peak tree RSS MB':>16} | "
              f"{'max proc RSS MB':>15} | ok")
        print("-" * 92)
    for r in rows:
        print(f"{r['size']:>6} | {r['command']:<10} | {r['items']:>6} | {r['wall_s']:>7.1f} | "
              f"{r['items'] / r['wall_s']:>8.1f} | {r['tree_mb']:>16.0f} | {r['max_rss_mb']:>15.0f} | "
              f"{'yes' if r['ok'] else 'NO (rc ' + str(r['rc']) + ')'}", flush=True)


def resume_checks(a: argparse.Namespace, n: int, work: Path, stage1: Path, stage2: Path,
                  prepared: tuple[Path, dict[str, int]]) -> None:
    """Kill each command part-way, start it again, and check what the second run reuses and writes."""
    src = work / f"text-{n}.jsonl"
    out = work / f"resume-interleaved-{n}"
    shutil.rmtree(out, ignore_errors=True)
    shard = max(1, min(a.shard_size, n // 4))
    cmd = interleave_cmd(stage2, src, out, shard, a.batch_size)
    first = run_measured(cmd, work / "resume-interleave-1.log",
                         kill_when=lambda: (out / "shards" / "00000" / "shard.json").is_file())
    done = sorted(d.name for d in (out / "shards").iterdir() if (d / "shard.json").is_file())
    second = run_measured(cmd, work / "resume-interleave-2.log")
    stats = json.loads((out / "stats.json").read_text()) if (out / "stats.json").is_file() else {}
    chunks = count_items(out / "chunks") if second["rc"] == 0 else -1
    ok = first["killed"] and second["rc"] == 0 and stats.get("shards_reused", 0) > 0 and chunks == n
    print(f"resume interleave (N={n}, shard size {shard}): killed after {first['wall_s']:.1f} s with finished shards "
          f"{done}; rerun rc {second['rc']} in {second['wall_s']:.1f} s, shards written {stats.get('shards_written')}, "
          f"reused {stats.get('shards_reused')}, chunks {chunks} (want {n}) -> {'PASS' if ok else 'FAIL'}", flush=True)

    data, counts = prepared
    out = work / f"resume-tokens-{n}"
    shutil.rmtree(out, ignore_errors=True)
    cmd = tokenize_cmd(stage1, data, out, a.tokenize_batch)
    started: list[float] = []

    def in_train() -> bool:
        staging = list((out / "chunks").glob(".train.*")) if (out / "chunks").is_dir() else []
        if staging and not started:
            started.append(time.perf_counter())
        return bool(started) and time.perf_counter() - started[0] > 2.0

    first = run_measured(cmd, work / "resume-tokenize-1.log", kill_when=in_train)
    left = sorted(p.name for p in (out / "chunks").glob(".*")) if (out / "chunks").is_dir() else []
    second = run_measured(cmd, work / "resume-tokenize-2.log")
    got = {s: count_items(out / "chunks" / s) for s in counts} if second["rc"] == 0 else {}
    leftover = sorted(p.name for p in (out / "chunks").glob(".*"))
    ok = first["killed"] and second["rc"] == 0 and got == counts
    print(f"resume tokenize (utterances {counts}): killed after {first['wall_s']:.1f} s in the train split "
          f"(staging {left}); rerun rc {second['rc']} in {second['wall_s']:.1f} s, counts {got} -> "
          f"{'PASS' if ok else 'FAIL'}; temp folders left after the rerun: {leftover or 'none'}", flush=True)


if __name__ == "__main__":
    main()
