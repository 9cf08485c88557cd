"""ASR scoring shared by every stage: Mandarin by character error rate, English by word error rate; and the ``asr``
eval task (KE-Omni §5.3 "Modality Alignment"; GLM-4-Voice §3.1 ASR-WER).

    python -m lit_keomni eval asr --export checkpoints/stage1/export --data data/builtin --split val
    python -m lit_keomni eval asr --pairs pairs.jsonl                       # {"reference", "hypothesis", "language"}
    python -m lit_keomni eval asr --export checkpoints/stage1/export --audio-jsonl generated.jsonl  # {"audio", "text", "language"}

The first form transcribes prepared utterances with a stage-1 export (attention decoder, greedy, and its CTC head),
the second scores any system's transcripts, the third transcribes wav files (generated speech) against their text.
Reports ``OUT/asr.json`` and ``OUT/asr.md``: one row per decoder and language (all, zh, en).

Both sides of a pair pass through `normalize` first, the way the Whisper paper (appendix C) and the Chinese ASR
benchmarks score: case, punctuation (ASCII and CJK), full-width forms and spacing never count as errors.

- English: Whisper's own `EnglishTextNormalizer` (contractions, British → American spelling from the JSON mapping
  that `whisper_normalizer` ships, spelled-out numbers → digits; no download).
- Mandarin: Arabic numerals → Chinese numerals with `cn2an` ("3个" → "三个"), because Chinese references spell
  numbers out while ASR systems often emit digits. The opposite direction would need to guess which 一/十 are
  numbers; an2cn only touches digits. Spaces touching a Han character are removed.

`error_rate` aggregates over the corpus: total edits / total reference units, as `jiwer` does for lists, so a long
utterance weighs more than a short one (never the mean of per-utterance rates).
"""

from __future__ import annotations

import argparse
import re
import unicodedata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import cn2an
import jiwer
from whisper_normalizer.basic import BasicTextNormalizer
from whisper_normalizer.english import EnglishTextNormalizer

from lit_keomni.audio import SAMPLE_RATE
from lit_keomni.eval.report import read_jsonl, write_report

if TYPE_CHECKING:
    from torch import Tensor

_ZH = ("zh", "cmn")
_EN = ("en",)

_english = EnglishTextNormalizer()
_basic = BasicTextNormalizer()
_han = r"\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_space_near_han = re.compile(rf"\s+(?=[{_han}])|(?<=[{_han}])\s+")
_mixed_units = re.compile(rf"[{_han}]|[^\s{_han}]+")
_digits = re.compile(r"\d")
_thousands_comma = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")


def language_family(language: str) -> str:
    """Map a language code ("zh", "cmn", "zh-CN", "en", "en-US", ...) to "zh" or "en"; ValueError otherwise."""
    base = language.lower().replace("_", "-").split("-")[0]
    if base in _ZH:
        return "zh"
    if base in _EN:
        return "en"
    raise ValueError(f"unsupported language {language!r}: expected zh/cmn or en")


def normalize(text: str, language: str) -> str:
    """Normalise `text` for scoring in `language` (see the module docstring).

    >>> normalize("Hello, WORLD!", "en")
    'hello world'
    >>> normalize("我有 3 个苹果。", "zh")
    '我有三个苹果'
    """
    text = unicodedata.normalize("NFKC", text).lower()  # full-width → half-width before any rule looks at it
    if language_family(language) == "en":
        # Whisper keeps "." "%" "$" for numbers ("3.5", "$20") but leaves lone ones ("..." → "."): drop those.
        out = " ".join(w for w in _english(text).split() if any(c.isalnum() for c in w))
    else:
        if _digits.search(text):
            # Before punctuation removal: "3.5" and "50%" carry meaning that cn2an spells out (三点五, 百分之五十).
            # cn2an reads "1,000" as 1 and 000, so drop thousands separators. Known limit: it reads "10:30" or
            # "2024-05-01" as plain cardinals and minus signs, not as a speaker would say them.
            text = cn2an.transform(_thousands_comma.sub("", text), "an2cn")
        out = _space_near_han.sub("", _basic(text))
    return re.sub(r"\s+", " ", out).strip()


def error_rate(
    references: Sequence[str], hypotheses: Sequence[str], languages: Sequence[str]
) -> dict[str, float | int]:
    """Corpus-level error rates of `hypotheses` against `references`, one language code per pair.

    Returns fractions (0.25, not 25) in [0, inf):

    - "cer_zh": Mandarin CER over characters, spaces excluded. "wer_en" / "cer_en": English WER and CER
      (jiwer's CER, which counts the spaces between words).
    - "cer": all characters pooled (the zh and en character counts above). "wer": mixed error rate over all
      utterances, where each Han character is one unit and each run of other characters one word, so it equals
      "cer_zh" on pure Mandarin and "wer_en" on English.
    - "n_zh", "n_en": utterances scored; "n_empty_ref": pairs skipped because the normalised reference is empty
      (nothing to divide by; an empty hypothesis is fine and scores as all deletions).

    Keys of a language with no scored utterance are absent (never NaN); "cer"/"wer" are absent when nothing was scored.
    """
    if not len(references) == len(hypotheses) == len(languages):
        raise ValueError(
            f"error_rate: lengths differ: references={len(references)}, "
            f"hypotheses={len(hypotheses)}, languages={len(languages)}"
        )
    pairs: dict[str, tuple[list[str], list[str]]] = {"zh": ([], []), "en": ([], [])}
    n_empty = 0
    for ref, hyp, lang in zip(references, hypotheses, languages):
        family = language_family(lang)
        ref, hyp = normalize(ref, family), normalize(hyp, family)
        if not ref:
            n_empty += 1
            continue
        pairs[family][0].append(ref)
        pairs[family][1].append(hyp)

    out: dict[str, float | int] = {}
    char_edits = char_total = unit_edits = unit_total = 0
    for family, (refs, hyps) in pairs.items():
        if not refs:
            continue
        out[f"n_{family}"] = len(refs)
        if family == "zh":
            chars = _edits(
                jiwer.process_characters([r.replace(" ", "") for r in refs], [h.replace(" ", "") for h in hyps])
            )
            units = _edits(jiwer.process_words([_split_units(r) for r in refs], [_split_units(h) for h in hyps]))
            out["cer_zh"] = chars[0] / chars[1]
        else:
            chars = _edits(jiwer.process_characters(refs, hyps))
            units = _edits(jiwer.process_words(refs, hyps))
            out["wer_en"] = units[0] / units[1]
            out["cer_en"] = chars[0] / chars[1]
        char_edits, char_total = char_edits + chars[0], char_total + chars[1]
        unit_edits, unit_total = unit_edits + units[0], unit_total + units[1]
    if char_total:
        out["cer"] = char_edits / char_total
        out["wer"] = unit_edits / unit_total
    out["n_empty_ref"] = n_empty
    return out


def _split_units(text: str) -> str:
    """Space-separate the scoring units of a Mandarin line: each Han character, and each word of other text."""
    return " ".join(_mixed_units.findall(text))


def _edits(result: jiwer.WordOutput | jiwer.CharacterOutput) -> tuple[int, int]:
    """(substitutions + deletions + insertions, reference length) of a jiwer result, summed over its utterances."""
    edits = result.substitutions + result.deletions + result.insertions
    return edits, result.substitutions + result.deletions + result.hits


# ---------------------------------------------------------------------------------------------------- the eval task


class Transcriber:
    """Audio (16 kHz float tensors) -> text with a stage-1 export: greedy attention decoding and the CTC head's best
    path, both from one encoder pass. Clips are batched by length (longest first) so a batch wastes little padding."""

    def __init__(self, export: str | Path, device: str = "cpu", batch_size: int = 16, max_tokens: int | None = None) -> None:
        import torch

        from lit_keomni.checkpoints import load_speech_tokenizer
        from lit_keomni.nn.audio import LogMel

        self.model, self.tokenizer, self.meta = load_speech_tokenizer(export)
        self.device = torch.device(device)
        self.model.to(self.device)
        self.logmel = LogMel(n_mels=self.model.config.n_mels).to(self.device)
        self.batch_size = batch_size
        self.max_tokens = max_tokens or self.model.config.max_target_positions
        # mel frames at 100 Hz, halved by the conv stem: max_source_positions frames of 20 ms
        self.max_samples = self.model.config.max_source_positions * 2 * self.logmel.hop_length

    def __call__(self, wavs: Sequence[Tensor]) -> tuple[list[str], list[str]]:
        """(attention-decoder transcripts, CTC transcripts), in the order of ``wavs``."""
        import torch

        tok = self.tokenizer
        order = sorted(range(len(wavs)), key=lambda i: -len(wavs[i]))
        attention, ctc = [""] * len(wavs), [""] * len(wavs)
        with torch.no_grad():
            for start in range(0, len(order), self.batch_size):
                idx = order[start : start + self.batch_size]
                lengths = torch.tensor([len(wavs[i]) for i in idx])
                audio = torch.zeros(len(idx), int(lengths.max()))
                for row, i in enumerate(idx):
                    audio[row, : len(wavs[i])] = wavs[i]
                mel, mel_lengths = self.logmel(audio.to(self.device), lengths.to(self.device))
                enc = self.model.encoder(mel, mel_lengths)
                hyps = self.model.greedy_decode(enc.hidden, enc.lengths, [tok.bos_id], tok.eos_id, self.max_tokens)
                ctc_hyps = self.model.ctc_greedy(enc, blank=tok.pad_id)
                for row, i in enumerate(idx):
                    attention[i], ctc[i] = tok.decode(hyps[row]), tok.decode(ctc_hyps[row])
        return attention, ctc


def summary_rows(system: str, scores: dict[str, float | int]) -> list[dict[str, Any]]:
    """Table rows of one system's ``error_rate`` result, in percent: "all" (pooled characters; mixed units for WER),
    "zh" (CER) and "en" (CER and WER), each only where it scored utterances."""
    rows = []
    n = int(scores.get("n_zh", 0)) + int(scores.get("n_en", 0))
    if "cer" in scores:
        rows.append({"system": system, "language": "all", "utterances": n,
                     "CER %": 100 * scores["cer"], "WER %": 100 * scores["wer"]})
    if "cer_zh" in scores:
        rows.append({"system": system, "language": "zh", "utterances": scores["n_zh"], "CER %": 100 * scores["cer_zh"],
                     "WER %": ""})
    if "wer_en" in scores:
        rows.append({"system": system, "language": "en", "utterances": scores["n_en"], "CER %": 100 * scores["cer_en"],
                     "WER %": 100 * scores["wer_en"]})
    return rows


def _checked_language(record: dict[str, Any], where: str) -> str:
    try:
        return language_family(record["language"])
    except ValueError as e:
        raise ValueError(f"{where}: field 'language': {e}") from None


def _item_error(reference: str, hypothesis: str, language: str) -> float | None:
    """One utterance's CER (zh) or WER (en); None when its normalised reference is empty."""
    scores = error_rate([reference], [hypothesis], [language])
    return scores.get("cer_zh", scores.get("wer_en"))


def _prepared_items(data: str | Path, split: str, limit: int | None) -> tuple[list[dict[str, Any]], list[Tensor]]:
    """Utterances of a prepared split (``DATA/chunks/SPLIT``) as items and 16 kHz audio."""
    from litdata import StreamingDataset

    from datamodules.streaming import chunks_dir
    from datamodules.tokenizer import asr_example

    src = chunks_dir(data, split)
    if not (src / "index.json").is_file():
        raise FileNotFoundError(f"{src}: no prepared chunks (run `python -m lit_keomni prepare --out {data}`)")
    dataset = StreamingDataset(str(src))
    n = len(dataset) if limit is None else min(limit, len(dataset))
    items, wavs = [], []
    for i in range(n):
        example = asr_example(dataset[i])
        items.append({"id": example["id"], "language": language_family(example["language"]), "reference": example["text"]})
        wavs.append(example["audio"])
    return items, wavs


def _audio_jsonl_items(path: str | Path, limit: int | None, max_samples: int) -> tuple[list[dict[str, Any]], list[Tensor]]:
    """Records ``{"audio", "text", "language"}`` of ``path`` (relative audio paths are relative to its folder), with
    their audio resampled to 16 kHz."""
    import torch

    from lit_keomni.nn.audio import load_wav

    items, wavs = [], []
    for record in read_jsonl(path, ["audio", "text", "language"], files=["audio"])[:limit]:
        where = f"{path} item {record['id']!r}"
        language, audio = _checked_language(record, where), record["audio"]
        try:
            wav, _ = load_wav(audio, SAMPLE_RATE)
        except RuntimeError as e:  # soundfile's error for a file it cannot decode
            raise ValueError(f"{where}: field 'audio': {audio} is not a readable audio file ({e})") from None
        if len(wav) > max_samples:
            raise ValueError(f"{where}: {audio} lasts {len(wav) / SAMPLE_RATE:.1f} s, longer than the stage-1 encoder's "
                             f"{max_samples / SAMPLE_RATE:.0f} s")
        items.append({"id": record["id"], "language": language, "reference": record["text"], "audio": audio})
        wavs.append(torch.from_numpy(wav))
    return items, wavs


def _pairs_items(path: str | Path, limit: int | None) -> list[dict[str, Any]]:
    path = Path(path)
    records = read_jsonl(path, [("reference", "ref"), ("hypothesis", "hyp"), "language"])[:limit]
    return [{"id": r["id"], "language": _checked_language(r, f"{path} item {r['id']!r}"), "reference": r["reference"],
             "hypothesis": r["hypothesis"]} for r in records]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", help="prepared data folder (chunks/{train,val}); transcribed with --export")
    source.add_argument("--pairs", help='JSONL of {"reference" (or "ref"), "hypothesis" (or "hyp"), "language"}: scored as is')
    source.add_argument("--audio-jsonl", help='JSONL of {"audio": wav path, "text", "language"}; transcribed with --export')
    parser.add_argument("--export", help="stage-1 export folder (speech tokenizer with its ASR decoder)")
    parser.add_argument("--split", default="val", help="prepared split with --data (default: val)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N utterances")
    parser.add_argument("--batch-size", type=int, default=16, help="utterances transcribed per batch")
    parser.add_argument("--max-tokens", type=int, default=None, help="decoding limit per utterance (default: the model's)")
    parser.add_argument("--no-ctc", action="store_true", help="do not report the CTC head")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="reports", help="report folder: asr.json, asr.md (default: reports)")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Transcribe (unless ``--pairs``), score, write the report; returns {"summary", "scores", "json", "markdown"}."""
    settings: dict[str, Any] = {"limit": args.limit}
    if args.pairs:
        items = _pairs_items(args.pairs, args.limit)
        settings["pairs"] = str(args.pairs)
        systems = {"pairs": [it["hypothesis"] for it in items]}
    else:
        if not args.export:
            raise ValueError("eval asr: --export (a stage-1 export) is needed to transcribe --data or --audio-jsonl")
        transcriber = Transcriber(args.export, args.device, args.batch_size, args.max_tokens)
        if args.data:
            items, wavs = _prepared_items(args.data, args.split, args.limit)
            settings.update(data=str(args.data), split=args.split)
        else:
            items, wavs = _audio_jsonl_items(args.audio_jsonl, args.limit, transcriber.max_samples)
            settings["audio_jsonl"] = str(args.audio_jsonl)
        if not items:
            raise ValueError(f"eval asr: nothing to transcribe in {args.data or args.audio_jsonl}")
        attention, ctc = transcriber(wavs)
        systems = {"attention": attention} if args.no_ctc else {"attention": attention, "ctc": ctc}
        settings.update(export=str(args.export), device=args.device, max_tokens=transcriber.max_tokens)
        for it, hyp in zip(items, attention):
            it["hypothesis"] = hyp
        if not args.no_ctc:
            for it, hyp in zip(items, ctc):
                it["ctc"] = hyp
    refs, langs = [it["reference"] for it in items], [it["language"] for it in items]
    scores, rows = {}, []
    for system, hyps in systems.items():
        scores[system] = error_rate(refs, hyps, langs)
        rows += summary_rows(system, scores[system])
        key = "error" if system in ("attention", "pairs") else f"{system}_error"
        for it, hyp in zip(items, hyps):
            it[key] = _item_error(it["reference"], hyp, it["language"])
    settings["scores"] = scores
    empty = next(iter(scores.values()))["n_empty_ref"]
    notes = ("Error rates in %: CER over characters (spaces excluded for zh), WER over words; the \"all\" row pools "
             "characters, and its WER counts each Han character as one word. Text normalised before scoring "
             "(lit_keomni.eval.asr.normalize).")
    if empty:
        notes += f" {empty} utterance(s) with an empty normalised reference were not scored."
    json_path, md_path = write_report(args.out, "asr", rows, settings=settings, items=items,
                                      columns=["system", "language", "utterances", "CER %", "WER %"],
                                      title="ASR error rates", notes=notes)
    print(f"asr: {json_path}\n{md_path.read_text()}")
    return {"summary": rows, "scores": scores, "json": str(json_path), "markdown": str(md_path)}
