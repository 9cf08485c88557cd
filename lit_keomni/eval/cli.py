"""``python -m lit_keomni eval TASK [options]``: one module per task, each with ``add_arguments(parser)`` and
``run(args) -> dict`` (the summary it reported); imported only when its task is asked for."""

from __future__ import annotations

import argparse
import importlib

TASKS = {
    "asr": ("lit_keomni.eval.asr", "CER (Mandarin) / WER (English) of a stage-1 export on prepared audio, or of a JSONL of pairs"),
    "storycloze": ("lit_keomni.eval.storycloze", "S, T→S, S→T story continuation by length-normalised likelihood"),
    "spoken-qa": ("lit_keomni.eval.spoken_qa", "spoken question answering (S, S→T) with 'the answer is' prompting"),
    "resynth": ("lit_keomni.eval.resynth", "CER/WER (and UTMOS) of held-out speech resynthesised by a decoder, beside the original"),
    "utmos": ("lit_keomni.eval.utmos", "UTMOS of generated audio with local utmos-pytorch weights"),
    "judge": ("lit_keomni.eval.judge", "S2TIF content/style 1-5 scores from an OpenAI-compatible endpoint"),
}


def usage() -> str:
    return "usage: python -m lit_keomni eval TASK [options]\n\ntasks:\n" + "\n".join(
        f"  {name:<12} {text}" for name, (_, text) in TASKS.items())


def eval_command(argv: list[str]) -> dict:
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return {}
    task, rest = argv[0], argv[1:]
    if task not in TASKS:
        raise ValueError(f"eval: unknown task {task!r}; known: {', '.join(TASKS)}")
    module = importlib.import_module(TASKS[task][0])
    parser = argparse.ArgumentParser(prog=f"python -m lit_keomni eval {task}", description=TASKS[task][1])
    module.add_arguments(parser)
    return module.run(parser.parse_args(rest))
