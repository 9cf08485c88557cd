"""ASR scoring shared by every stage: Mandarin by character error rate, English by word error rate.

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

import re
import unicodedata
from typing import Sequence

import cn2an
import jiwer
from whisper_normalizer.basic import BasicTextNormalizer
from whisper_normalizer.english import EnglishTextNormalizer

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
