"""The command line: LightningCLI for ``fit``/``validate``/``test`` and a few data commands, each a thin call.

    python -m lit_keomni fit --config recipes/stage1.yaml
    python -m lit_keomni prepare [--source PATH] --out data/builtin
    python -m lit_keomni tokenize --export checkpoints/stage1/export --data data/builtin --out data/tokens
"""

from __future__ import annotations

import sys
from pathlib import Path

from jsonargparse import ArgumentParser
from lightning.pytorch.cli import LightningCLI

from lit_keomni.checkpoints import AtomicCheckpointIO

STAGES = {
    "stage1": "speech tokenizer (Whisper encoder + 12.5 Hz VQ, ASR-supervised)  lit_keomni.stages.tokenizer.SpeechTokenizer",
}
TRAINER_COMMANDS = ("fit", "validate", "test")


def _recipes() -> list[str]:
    root = Path(__file__).resolve().parent.parent / "recipes"
    return sorted(str(p.relative_to(root.parent)) for p in root.rglob("*.yaml")) if root.is_dir() else []


def usage() -> str:
    lines = [
        "usage: python -m lit_keomni COMMAND [options]   (COMMAND --help for its options)",
        "",
        "training (LightningCLI):",
        "  fit --config RECIPE        train a stage; writes checkpoints/stageN/{last.ckpt,export/} and TensorBoard logs",
        "  validate --config RECIPE   run validation (add --ckpt_path checkpoints/stageN/last.ckpt)",
        "  test --config RECIPE       run the test loop",
        "data:",
        "  prepare                    build the built-in corpus (or --source your Ke-SpeechChat data) into litdata chunks",
        "  tokenize                   encode prepared audio into speech tokens with a stage-1 export",
        "",
        "stages:",
        *(f"  {name}  {text}" for name, text in STAGES.items()),
        "",
        "recipes:",
        *(f"  {r}" for r in _recipes()),
    ]
    return "\n".join(lines)


class KeOmniCLI(LightningCLI):
    """LightningCLI with our defaults: any stage module/datamodule by ``class_path``, atomic checkpoint files."""

    def __init__(self, args: list[str] | None = None, run: bool = True) -> None:
        super().__init__(
            model_class=None,
            datamodule_class=None,
            subclass_mode_model=True,
            subclass_mode_data=True,
            seed_everything_default=1234,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"parser_mode": "yaml"},
            args=args,
            run=run,
        )

    def instantiate_trainer(self, **kwargs):  # type: ignore[override]
        # Checkpoint files are always written atomically (temp file + rename), whatever the recipe says.
        plugins = list(kwargs.pop("plugins", None) or [])
        if not any(hasattr(p, "save_checkpoint") for p in plugins):
            plugins.append(AtomicCheckpointIO())
        return super().instantiate_trainer(plugins=plugins, **kwargs)


def prepare_command(argv: list[str]) -> None:
    from datamodules.streaming import prepare

    p = ArgumentParser(prog="python -m lit_keomni prepare", description="Validate Ke-SpeechChat dialogues and write litdata chunks.")
    p.add_function_arguments(prepare, skip={"progress"})
    p.add_argument("--source", type=str | None, default=None,
                   help="Ke-SpeechChat data: folder of per-dialogue JSON, a JSON list, or JSONL; omit for the built-in corpus")
    p.add_argument("--out", type=str, default="data/builtin", help="output folder (chunks/, tokenizer.json, prepared.json)")
    cfg = p.parse_args(argv)
    kwargs = {k: v for k, v in vars(cfg).items() if k not in ("out", "source", "__path__")}
    stamp = prepare(cfg.out, cfg.source, **kwargs)
    print(f"prepared {stamp['utterances']} utterances ({stamp['hours']} h) in {cfg.out}")


def tokenize_command(argv: list[str]) -> None:
    from lit_keomni.speech_tokens import tokenize

    p = ArgumentParser(prog="python -m lit_keomni tokenize", description="Encode prepared audio into speech tokens.")
    p.add_function_arguments(tokenize)
    cfg = p.parse_args(argv)
    stamp = tokenize(**{k: v for k, v in vars(cfg).items() if k != "__path__"})
    print(f"wrote speech tokens ({stamp['frame_rate_hz']} Hz, {stamp['codebook_size']} codes) for {stamp['splits']} to {cfg.out}")


COMMANDS = {"prepare": prepare_command, "tokenize": tokenize_command}


def main(argv: list[str] | None = None) -> None:
    from_shell = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return
    command, rest = argv[0], argv[1:]
    if command in COMMANDS:
        try:
            COMMANDS[command](rest)
        except (ValueError, FileNotFoundError) as e:
            sys.exit(f"error: {e}")
        return
    if command not in TRAINER_COMMANDS:
        sys.exit(f"error: unknown command {command!r}\n\n{usage()}")
    KeOmniCLI(args=None if from_shell else argv)
