"""What the speech-LM evaluations (``storycloze``, ``spoken_qa``) share: loading a ``speech_lm`` export with the stage-1
export that made its speech tokens, turning audio files into speech tokens and speech tokens back into text with that
stage-1 export (its encoder up to the VQ, its ASR decoder), batched log-likelihoods of scored token spans, and the
records of an evaluation JSONL.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from lit_keomni import checkpoints
from lit_keomni.audio import SAMPLE_RATE
from lit_keomni.checkpoints import CONFIG_FILE, load_lm
from lit_keomni.eval.report import read_jsonl
from lit_keomni.nn.audio import load_wav
from lit_keomni.nn.transformer import Transformer
from lit_keomni.text.templates import DIALOGUE_MODES, pad_batch
from lit_keomni.text.tokenizer import TextTokenizer


# ---------------------------------------------------------------------------------------------------- exports
def export_kind(path: str | Path) -> str:
    """The ``kind`` field of an export folder's ``config.json`` (``speech_lm``, ``keomni_lm``, ...)."""
    kind = checkpoints.export_kind(path, expected="--model must be an export folder")
    if kind is None:
        raise ValueError(f"{Path(path) / CONFIG_FILE}: field 'kind' missing")
    return kind


@dataclass
class SpeechLM:
    """A loaded ``speech_lm`` export (stage 3 pretrain or stage 4 discrete SFT) and the stage-1 export of its tokens."""

    path: Path
    model: Transformer
    tokenizer: TextTokenizer
    meta: dict[str, Any]
    speech_export: Path

    @property
    def stage(self) -> str:
        """``pretrain`` or ``sft``."""
        return self.meta["stage"]

    @property
    def template(self) -> str | None:
        """The SFT dialogue template (one of ``DIALOGUE_MODES``); None for a pretrained model."""
        return self.meta.get("template") if self.stage == "sft" else None

    @property
    def label(self) -> str:
        return self.stage + (f" ({self.template})" if self.template else "")

    @property
    def frame_rate_hz(self) -> float:
        return float(self.meta["speech_tokenizer"]["frame_rate_hz"])


def load_speech_lm(path: str | Path, speech_export: str | Path | None = None, device: str = "cpu") -> SpeechLM:
    """Load a ``speech_lm`` export on ``device``; its stage-1 export is ``speech_export`` or the one its
    ``config.json`` names (field ``speech_tokenizer.export``)."""
    model, tokenizer, meta = load_lm(path, "speech_lm")
    cfg = Path(path) / CONFIG_FILE
    stage = meta.get("stage")
    if stage not in ("pretrain", "sft"):
        raise ValueError(f"{cfg}: field 'stage' is {stage!r}, expected 'pretrain' or 'sft'")
    if stage == "sft" and meta.get("template") not in DIALOGUE_MODES:
        raise ValueError(f"{cfg}: field 'template' is {meta.get('template')!r}, expected one of {DIALOGUE_MODES}")
    if speech_export is None:
        speech_export = meta.get("speech_tokenizer", {}).get("export")
        if not speech_export:
            raise ValueError(f"{cfg}: field 'speech_tokenizer.export' missing; pass --speech-export")
    return SpeechLM(Path(path), model.to(device), tokenizer, meta, Path(speech_export))


def stage1_for(lm: SpeechLM, cache: dict[Path, "Stage1Speech"], device: str = "cpu") -> "Stage1Speech":
    """The ``Stage1Speech`` of ``lm``'s stage-1 export, loaded once per export into ``cache``; its codebook must be the
    one ``lm`` was trained on."""
    key = lm.speech_export.resolve()
    if key not in cache:
        cache[key] = Stage1Speech(key, device)
    if cache[key].codebook_size != lm.tokenizer.num_audio_tokens:
        raise ValueError(f"{key}: codebook of {cache[key].codebook_size} speech tokens, but {lm.path} was trained on "
                         f"{lm.tokenizer.num_audio_tokens}")
    return cache[key]


# ---------------------------------------------------------------------------------------------------- speech
class Stage1Speech:
    """A stage-1 export used both ways: audio files -> speech tokens (cached per file) and speech tokens -> text (its
    ASR decoder, greedy), the way GLM-4-Voice reads generated speech back with an ASR model."""

    def __init__(self, export: str | Path, device: str = "cpu") -> None:
        from lit_keomni.speech_tokens import SpeechTokenEncoder

        self.export = Path(export)
        self.encoder = SpeechTokenEncoder(self.export, device)
        self._codes: dict[Path, list[int]] = {}

    @property
    def max_samples(self) -> int:
        """Longest clip the encoder takes: max_source_positions frames of 2 mel hops each."""
        return self.encoder.model.config.max_source_positions * 2 * self.encoder.logmel.hop_length

    @property
    def codebook_size(self) -> int:
        return int(self.encoder.meta["codebook_size"])

    def encode_files(self, paths: Sequence[Path], batch_size: int = 16) -> list[list[int]]:
        """Speech tokens of each audio file (read as 16 kHz mono), encoded in batches of ``batch_size``."""
        todo = list(dict.fromkeys(p for p in paths if p not in self._codes))
        for i in range(0, len(todo), batch_size):
            chunk = todo[i: i + batch_size]
            wavs = [torch.from_numpy(load_wav(p, SAMPLE_RATE)[0]) for p in chunk]
            for p, w in zip(chunk, wavs):
                if len(w) > self.max_samples:
                    raise ValueError(f"{p}: lasts {len(w) / SAMPLE_RATE:.1f} s, longer than the stage-1 encoder's "
                                     f"{self.max_samples / SAMPLE_RATE:.0f} s ({self.export})")
            for p, c in zip(chunk, self.encoder(wavs)):
                self._codes[p] = [int(x) for x in c]
        return [self._codes[p] for p in paths]

    @torch.no_grad()
    def transcribe(self, codes: Sequence[Sequence[int]], max_tokens: int = 128, batch_size: int = 16) -> list[str]:
        """Text of each speech-token sequence by the stage-1 ASR decoder; an empty sequence reads as "". A batch is
        decoded for at most ``max_tokens`` and at most 2 text tokens per speech token (+ 8) of its longest sequence:
        speech at 12.5 Hz says far fewer than 25 text tokens a second."""
        model, tok = self.encoder.model, self.encoder.text_tokenizer
        device = self.encoder.device
        out = [""] * len(codes)
        todo = [i for i, c in enumerate(codes) if len(c)]
        for start in range(0, len(todo), batch_size):
            rows = todo[start: start + batch_size]
            lengths = torch.tensor([len(codes[i]) for i in rows], device=device)
            padded = torch.zeros(len(rows), int(lengths.max()), dtype=torch.long, device=device)
            for j, i in enumerate(rows):
                padded[j, : len(codes[i])] = torch.tensor(list(codes[i]), dtype=torch.long)
            limit = min(max_tokens, 2 * int(lengths.max()) + 8)
            ids = model.transcribe_codes(padded, lengths, [tok.bos_id], tok.eos_id, max_tokens=limit)
            for i, row in zip(rows, ids):
                out[i] = tok.decode(row)
        return out


# ---------------------------------------------------------------------------------------------------- scoring
@torch.no_grad()
def sequence_logprobs(model: Transformer, rows: Sequence[tuple[list[int], list[bool]]], pad_id: int,
                      batch_size: int = 16) -> list[tuple[float, int]]:
    """(sum of log-probabilities, number of tokens) of the scored tokens of each ``(ids, mask)`` row (a token is
    scored when its mask entry is True; the first token is never predicted). Rows are sorted by length and
    right-padded into batches, one forward pass per batch; padding follows every real token, so the causal model
    never sees it."""
    limit = model.config.block_size
    for k, (ids, mask) in enumerate(rows):
        if len(ids) != len(mask):
            raise ValueError(f"sequence_logprobs: row {k} has {len(ids)} ids but {len(mask)} mask entries")
        if len(ids) - 1 > limit:
            raise ValueError(f"sequence_logprobs: row {k} has {len(ids)} tokens, more than the model's "
                             f"TransformerConfig field 'block_size' ({limit}) + 1")
    device = model.embed.weight.device
    order = sorted(range(len(rows)), key=lambda k: len(rows[k][0]))
    out: list[tuple[float, int]] = [(0.0, 0)] * len(rows)
    for start in range(0, len(order), batch_size):
        batch = order[start: start + batch_size]
        idx, tgt = pad_batch([rows[k] for k in batch], pad_id)
        idx, tgt = idx.to(device), tgt.to(device)
        logits = model(idx)[..., : model.config.vocab_size].float()
        nll = F.cross_entropy(logits.flatten(0, 1), tgt.flatten(), ignore_index=-100, reduction="none")
        nll = nll.view(tgt.shape)
        scored = tgt != -100
        for j, k in enumerate(batch):
            out[k] = (-float(nll[j][scored[j]].sum()), int(scored[j].sum()))
    return out


# ---------------------------------------------------------------------------------------------------- data
def read_records(path: str | Path, fields: Sequence[str], limit: int | None = None) -> list[dict[str, Any]]:
    """The first ``limit`` records of an evaluation JSONL (``report.read_jsonl``: every field of ``fields`` a string,
    an ``id`` each), with ``language`` checked to be ``en`` or ``zh``."""
    if limit is not None and limit < 1:
        raise ValueError(f"--limit {limit}: must be >= 1")
    records = read_jsonl(path, ["language", *fields])[:limit]
    for r in records:
        if r["language"] not in ("en", "zh"):
            raise ValueError(f"{path}: record {r['id']!r}: field 'language' is {r['language']!r}, "
                             "expected 'en' or 'zh'")
    return records


def audio_path(jsonl: str | Path, record: Mapping[str, Any], name: str) -> Path:
    """The audio file named by ``record[name]``, relative to the JSONL's folder unless absolute; it must exist."""
    value = record.get(name)
    where = f"{jsonl}: record {record.get('id')!r}: field '{name}'"
    if not isinstance(value, str) or not value:
        raise ValueError(f"{where} missing or not a path")
    path = Path(value) if Path(value).is_absolute() else Path(jsonl).parent / value
    if not path.is_file():
        raise FileNotFoundError(f"{where}: audio file {path} not found")
    return path


def has_fields(records: Iterable[Mapping[str, Any]], names: Sequence[str]) -> bool:
    """True when every record has every field of ``names`` with a non-empty value."""
    return all(r.get(n) not in (None, "") for r in records for n in names)


def by_language(values: Sequence[tuple[str, float]]) -> dict[str, float]:
    """Mean of ``(language, value)`` pairs per language, in percent: ``{"en": 75.0, "zh": 50.0}``."""
    out: dict[str, list[float]] = {}
    for lang, v in values:
        out.setdefault(lang, []).append(v)
    return {lang: 100.0 * sum(vs) / len(vs) for lang, vs in sorted(out.items())}


def add_common_arguments(parser: argparse.ArgumentParser, task: str, what: str, models: str, fields: str) -> None:
    """The options both speech-LM tasks take: models, data (``--data`` or ``--builtin``), output, stage-1 export,
    built-in set size, limit, batch size, device. ``task`` names the report files, ``what`` the items, ``fields``
    their JSONL fields."""
    folder = f"builtin_{task.replace('-', '_')}"
    parser.add_argument("--model", action="append", required=True, metavar="EXPORT",
                        help=f"{models}; repeat to compare models in one table")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help=f"JSONL of {what}: {fields}; audio paths relative to the JSONL's folder")
    src.add_argument("--builtin", action="store_true", help=f"the built-in toy set, built once into OUT/{folder}")
    parser.add_argument("--out", required=True, help=f"report folder: {task}.json, {task}.md")
    parser.add_argument("--speech-export", default=None,
                        help="stage-1 export for the audio (default: the one each model's config.json names)")
    parser.add_argument("--n-per-language", type=int, default=100, help=f"{what} per language of --builtin")
    parser.add_argument("--seed", type=int, default=1234, help="toy world of --builtin (1234: the built-in corpus's)")
    parser.add_argument("--limit", type=int, default=None, help=f"only the first N {what}")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass / generation batch")
    parser.add_argument("--device", default="cpu")
