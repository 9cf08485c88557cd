"""``utmos`` eval task: predicted MOS of speech (KE-Omni §5.3 "Speech Quality", Table 8; GLM-4-Voice §3.1, Table 5).

    python -m lit_keomni eval utmos --utmos-ckpt checkpoints/utmos/utmos_state_dict.pt --audio generated/   # *.wav
    python -m lit_keomni eval utmos --utmos-ckpt checkpoints/utmos/utmos_state_dict.pt --audio generated.jsonl

UTMOS (Saeki et al., 2022: the UTokyo-SaruLab strong learner of the VoiceMOS Challenge 2022, wav2vec 2.0 features +
a listener-conditioned BLSTM) through ``utmos-pytorch``, its fairseq-free port. Each file is resampled to 16 kHz
(soxr) and scored alone (batch size 1, as the package recommends: padding shifts scores). Reports the mean ± std
overall and per language (when the JSONL gives one) and every file's score in ``OUT/utmos.json``.

Weights are never downloaded: ``--utmos-ckpt`` must name the local ``utmos_state_dict.pt``, and every weight of the
model must be in it (the package itself would silently keep random weights for missing ones).
"""

from __future__ import annotations

import argparse
import math
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lit_keomni.audio import SAMPLE_RATE
from lit_keomni.eval.report import read_jsonl, write_report

if TYPE_CHECKING:
    from torch import nn

MIN_SAMPLES = 400
"""wav2vec 2.0's first convolution (kernel 10, stride 5) and the four after it need 25 ms of audio."""

WEIGHTS_HELP = (
    "the official converted UTMOS22 strong-learner weights are the file 'utmos_state_dict.pt' of the Hugging Face "
    "model repository Blinorot/UTMOS-PyTorch (converted from sarulab-speech/UTMOS22). Download it on a machine with "
    "network access, e.g. `huggingface-cli download Blinorot/UTMOS-PyTorch utmos_state_dict.pt --local-dir "
    "checkpoints/utmos`, and pass --utmos-ckpt checkpoints/utmos/utmos_state_dict.pt"
)


def load_utmos(ckpt: str | Path | None, device: str = "cpu") -> nn.Module:
    """``utmos_pytorch.UTMOSScoreTorch`` with the weights of ``ckpt`` (a state dict saved by ``torch.save``).

    Refuses, before the package could download anything, a missing path; and a file that is not a state dict or lacks
    any weight of the model or holds one of another shape (keys the model does not use are ignored, as the package
    does: the official file carries pre-training-only wav2vec 2.0 tensors)."""
    import torch
    from utmos_pytorch import UTMOSScoreTorch
    from utmos_pytorch.utmos_torch import UTMOSModel

    if ckpt is None or not Path(ckpt).is_file():
        given = "--utmos-ckpt not given" if ckpt is None else f"no such file {ckpt}"
        raise FileNotFoundError(f"UTMOS weights not found ({given}). Nothing is downloaded: {WEIGHTS_HELP}")
    ckpt = Path(ckpt)
    try:
        try:
            state = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)  # reads no tensor data
        except RuntimeError:  # a file in torch's legacy (non-zip) format cannot be memory-mapped
            state = torch.load(ckpt, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets one message naming it
        raise ValueError(f"{ckpt}: not a UTMOS state dict readable by torch.load ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{ckpt}: expected a state dict (parameter name -> tensor); {WEIGHTS_HELP}")
    with torch.device("meta"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*weight_norm")
        expected = UTMOSModel().state_dict()
    missing = [k for k in expected if k not in state]
    if missing:
        raise ValueError(f"{ckpt}: {len(missing)} of the model's {len(expected)} weights are missing (first: "
                         f"{missing[0]!r}): not a UTMOS checkpoint; {WEIGHTS_HELP}")
    wrong = [k for k, v in expected.items() if tuple(state[k].shape) != tuple(v.shape)]
    if wrong:
        k = wrong[0]
        raise ValueError(f"{ckpt}: weight {k!r} has shape {tuple(state[k].shape)}, the model needs {tuple(expected[k].shape)}")
    del state
    with warnings.catch_warnings():  # the package builds wav2vec 2.0's positional conv with the deprecated weight_norm
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*weight_norm")
        return UTMOSScoreTorch(ckpt_path=str(ckpt), device=device)


def score_files(scorer: nn.Module, paths: list[Path], device: str = "cpu") -> list[float]:
    """UTMOS of each audio file, one at a time, after mono mixing and resampling to 16 kHz."""
    import torch

    from lit_keomni.nn.audio import load_wav

    scores = []
    for path in paths:
        try:
            wav, _ = load_wav(path, SAMPLE_RATE)
        except RuntimeError as e:  # soundfile's error for a file it cannot decode
            raise ValueError(f"{path}: not a readable audio file ({e})") from None
        if len(wav) < MIN_SAMPLES:
            raise ValueError(f"{path}: {len(wav)} samples at 16 kHz, too short for UTMOS (needs {MIN_SAMPLES})")
        with torch.no_grad():
            score = float(scorer.score(torch.from_numpy(wav).to(device)[None]).reshape(-1)[0])
        if not math.isfinite(score):
            raise ValueError(f"{path}: UTMOS gave a non-finite score ({score})")
        scores.append(score)
    return scores


def audio_items(source: str | Path, limit: int | None = None) -> list[dict[str, Any]]:
    """Items ``{"id", "audio", ["language"]}`` from a folder (every ``*.wav`` below it, sorted) or a JSONL with an
    ``"audio"`` field (relative paths are relative to the JSONL's folder)."""
    source = Path(source)
    if source.is_dir():
        paths = sorted(source.rglob("*.wav"))
        if not paths:
            raise FileNotFoundError(f"{source}: no .wav files in this folder")
        items = [{"id": str(p.relative_to(source)), "audio": str(p)} for p in paths]
    elif source.is_file():
        items = [{"id": r["id"], "audio": r["audio"], **({"language": str(r["language"])} if "language" in r else {})}
                 for r in read_jsonl(source, ["audio"], files=["audio"])]
    else:
        raise FileNotFoundError(f"{source}: no such folder or JSONL file (--audio)")
    return items[:limit]


def _row(group: str, scores: list[float]) -> dict[str, Any]:
    mean = sum(scores) / len(scores)
    std = math.sqrt(sum((s - mean) ** 2 for s in scores) / len(scores))
    return {"language": group, "files": len(scores), "UTMOS": mean, "std": std, "UTMOS ± std": f"{mean:.2f} ± {std:.2f}"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--audio", required=True, help='folder of .wav files, or JSONL of {"audio": path[, "language"]}')
    parser.add_argument("--utmos-ckpt", default=None, help=f"local UTMOS weights (utmos_state_dict.pt); {WEIGHTS_HELP}")
    parser.add_argument("--limit", type=int, default=None, help="only the first N files")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="reports", help="report folder: utmos.json, utmos.md (default: reports)")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Score every file, write the report; returns {"summary", "json", "markdown"}."""
    items = audio_items(args.audio, args.limit)
    scorer = load_utmos(args.utmos_ckpt, args.device)
    for item, score in zip(items, score_files(scorer, [Path(it["audio"]) for it in items], args.device)):
        item["utmos"] = score
    rows = [_row("all", [it["utmos"] for it in items])]
    for language in sorted({it["language"] for it in items if "language" in it}):
        rows.append(_row(language, [it["utmos"] for it in items if it.get("language") == language]))
    json_path, md_path = write_report(
        args.out, "utmos", rows, settings={"audio": str(args.audio), "utmos_ckpt": str(args.utmos_ckpt),
                                           "sample_rate": SAMPLE_RATE, "limit": args.limit},
        items=items, columns=["language", "files", "UTMOS ± std"], title="UTMOS",
        notes="UTMOS22 strong learner (utmos-pytorch), 1-5, higher is better; mean ± population std over files.")
    print(f"utmos: {json_path}\n{md_path.read_text()}")
    return {"summary": rows, "json": str(json_path), "markdown": str(md_path)}
