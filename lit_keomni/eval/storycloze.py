"""Spoken StoryCloze (GLM-4-Voice §3.1 "Speech Language Modeling", Appendix C; Table 3): pick the right ending of a
story by likelihood.

    python -m lit_keomni eval storycloze --model checkpoints/stage3/export --model checkpoints/stage4/export \
        --builtin --out eval/storycloze

Settings (the model sees one sequence per ending; ``|`` separates the unscored prompt from the scored ending):
- ``S``   speech context -> speech ending, in one audio span:
  ``<|begin_of_audio|> ctx speech | ending speech <|end_of_audio|>``
- ``T→S`` text context -> speech ending: ``ctx text <|begin_of_audio|> | ending speech <|end_of_audio|>``
- ``S→T`` speech context -> text ending: ``<|begin_of_audio|> ctx speech <|end_of_audio|> | ending text <|eos|>``

The end marker (``<|end_of_audio|>`` after speech, ``<|eos|>`` after text) is scored as part of the ending: it says
that the story ends there, both endings carry exactly one, and it is how every speech span and text document of the
pre-training data closes. The chosen ending is the one with the higher log-likelihood divided by its number of scored
tokens (Appendix C: "normalized by the number of tokens in each continuation"); a tie counts as wrong. Speech comes
from each audio file encoded on its own by the model's stage-1 export (the context and the ending are separate
files, so the boundary between them is exact). Data: a JSONL of ``{context_text, context_audio, right_text,
right_audio, wrong_text, wrong_audio, language}`` (audio paths relative to the JSONL), or ``--builtin``
(``eval.builtin.build_storycloze_set``). Report: accuracy (%) per model and setting, overall and per language.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lit_keomni.eval.builtin import build_storycloze_set
from lit_keomni.eval.lm_scoring import (Stage1Speech, add_common_arguments, audio_path, by_language,
                                        export_kind, has_fields, load_speech_lm, read_records, sequence_logprobs,
                                        stage1_for)
from lit_keomni.eval.report import write_report
from lit_keomni.nn.transformer import Transformer
from lit_keomni.text.templates import BEGIN_AUDIO, END_AUDIO, build
from lit_keomni.text.tokenizer import TextTokenizer

SETTINGS = ("S", "T→S", "S→T")
ALIASES = {"S": "S", "T2S": "T→S", "T→S": "T→S", "S2T": "S→T", "S→T": "S→T"}
FIELDS = {"S": ("context_audio", "right_audio", "wrong_audio"),
          "T→S": ("context_text", "right_audio", "wrong_audio"),
          "S→T": ("context_audio", "right_text", "wrong_text")}
"""The JSONL fields each setting reads."""
COLUMNS = ("model", "stage", "setting", "accuracy", "en", "zh", "n")


def ending_row(tokenizer: TextTokenizer, setting: str, context_text: str | None, context_codes: Sequence[int] | None,
               ending_text: str | None, ending_codes: Sequence[int] | None) -> tuple[list[int], list[bool]]:
    """The sequence of one (context, ending) pair in ``setting`` and the mask of its scored tokens (the ending and its
    end marker; see the module docstring)."""
    tok = tokenizer
    boa, eoa = tok.token_to_id(BEGIN_AUDIO), tok.token_to_id(END_AUDIO)
    if setting == "S":
        prompt, ending = [boa, *tok.speech_to_ids(context_codes)], [*tok.speech_to_ids(ending_codes), eoa]
    elif setting == "T→S":
        prompt, ending = [*tok.encode(context_text), boa], [*tok.speech_to_ids(ending_codes), eoa]
    elif setting == "S→T":
        prompt, ending = [boa, *tok.speech_to_ids(context_codes), eoa], [*tok.encode(ending_text), tok.eos_id]
    else:
        raise ValueError(f"storycloze: unknown setting {setting!r}; known: {', '.join(SETTINGS)}")
    return build([(prompt, False), (ending, True)])


def prefers_right(right: tuple[float, int], wrong: tuple[float, int]) -> bool:
    """True when the right ending's mean log-likelihood per scored token beats the wrong one's (a tie is False).
    ``right``/``wrong``: (sum of log-probabilities, number of tokens)."""
    return right[0] / max(right[1], 1) > wrong[0] / max(wrong[1], 1)


def evaluate_setting(model: Transformer, tokenizer: TextTokenizer, setting: str, items: Sequence[Mapping[str, Any]],
                     batch_size: int = 16) -> list[dict[str, Any]]:
    """Score both endings of every item and say which wins. An item holds ``context_text``/``context_codes``,
    ``right_text``/``right_codes``, ``wrong_text``/``wrong_codes`` (codes: speech-token indices) as the setting
    needs, and ``language``. Returns per item: log-likelihoods, token counts, ``correct``."""
    rows = []
    for it in items:
        for which in ("right", "wrong"):
            rows.append(ending_row(tokenizer, setting, it.get("context_text"), it.get("context_codes"),
                                   it.get(f"{which}_text"), it.get(f"{which}_codes")))
    scores = sequence_logprobs(model, rows, tokenizer.pad_id, batch_size)
    out = []
    for k, it in enumerate(items):
        right, wrong = scores[2 * k], scores[2 * k + 1]
        out.append({"id": it.get("id", k), "language": it["language"], "right_logprob": right[0],
                    "right_tokens": right[1], "wrong_logprob": wrong[0], "wrong_tokens": wrong[1],
                    "correct": prefers_right(right, wrong)})
    return out


def summary_row(model: str, stage: str, setting: str, results: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One table row: accuracy (%) overall and per language, and the number of items."""
    langs = by_language([(r["language"], float(r["correct"])) for r in results])
    return {"model": model, "stage": stage, "setting": setting,
            "accuracy": 100.0 * sum(r["correct"] for r in results) / len(results), **langs, "n": len(results)}


def choose_settings(records: Sequence[Mapping[str, Any]], asked: Sequence[str] | None, data: Path) -> list[str]:
    """The asked settings (each needs its fields in every record), or by default every setting the data allows."""
    if asked:
        settings = list(dict.fromkeys(ALIASES[s] for s in asked))
        for s in settings:
            for r in records:
                for f in FIELDS[s]:
                    if r.get(f) in (None, ""):
                        raise ValueError(f"{data}: record {r['id']!r}: field '{f}' missing (setting {s} needs "
                                         f"{', '.join(FIELDS[s])})")
        return settings
    settings = [s for s in SETTINGS if has_fields(records, FIELDS[s])]
    if not settings:
        raise ValueError(f"{data}: no setting can run: every record needs the fields of one of "
                         + "; ".join(f"{s}: {', '.join(f)}" for s, f in FIELDS.items()))
    return settings


def audio_files(data: Path, records: Sequence[Mapping[str, Any]], fields: set[str]) -> dict[str, list[Path]]:
    """The audio file of every record for each audio field in ``fields``; text fields are checked to be strings."""
    for r in records:
        for f in sorted(fields):
            if not f.endswith("_audio") and not isinstance(r[f], str):
                raise ValueError(f"{data}: record {r['id']!r}: field '{f}' must be a string")
    return {f: [audio_path(data, r, f) for r in records] for f in sorted(fields) if f.endswith("_audio")}


def with_codes(records: Sequence[Mapping[str, Any]], audio: Mapping[str, list[Path]], speech: Stage1Speech,
               batch_size: int) -> list[dict[str, Any]]:
    """The records with the speech tokens of their audio (``context_audio`` -> ``context_codes``, ...) from the
    stage-1 export ``speech``."""
    items = [{k: v for k, v in r.items() if not k.endswith("_audio")} for r in records]
    for f, paths in audio.items():
        for it, c in zip(items, speech.encode_files(paths, batch_size)):
            it[f.removesuffix("_audio") + "_codes"] = c
    return items


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser, "storycloze", "stories", "speech_lm export folder (stage 3 or 4)",
                         "{context_text, context_audio, right_text, right_audio, wrong_text, wrong_audio, language}")
    parser.add_argument("--settings", nargs="+", choices=sorted(ALIASES), default=None,
                        help="S, T2S (T→S), S2T (S→T); default: every setting the data has fields for")


def run(args: argparse.Namespace) -> dict[str, Any]:
    data = (Path(args.data) if args.data else
            build_storycloze_set(Path(args.out) / "builtin_storycloze", args.n_per_language, args.seed))
    records = read_records(data, [], args.limit)
    settings = choose_settings(records, args.settings, data)
    audio = audio_files(data, records, {f for s in settings for f in FIELDS[s]})
    rows: list[dict[str, Any]] = []
    details: list[dict[str, Any]] = []
    stage1: dict[Path, Stage1Speech] = {}
    for path in args.model:
        kind = export_kind(path)
        if kind != "speech_lm":
            raise ValueError(f"{Path(path) / 'config.json'}: field 'kind' is {kind!r}; storycloze scores speech "
                             "tokens, so it needs a 'speech_lm' export")
        lm = load_speech_lm(path, args.speech_export, args.device)
        speech = stage1_for(lm, stage1, args.device)
        items = with_codes(records, audio, speech, args.batch_size)
        for setting in settings:
            results = evaluate_setting(lm.model, lm.tokenizer, setting, items, args.batch_size)
            rows.append(summary_row(str(path), lm.label, setting, results))
            details += [{"model": str(path), "setting": setting, **r} for r in results]
    notes = ("Accuracy (%) of choosing the right ending by log-likelihood per scored token (the ending and its end "
             "marker); chance is 50 %. Settings: S speech→speech, T→S text→speech, S→T speech→text "
             "(GLM-4-Voice Table 3).")
    json_path, md_path = write_report(args.out, "storycloze", rows, items=details, columns=COLUMNS,
                                      title="Spoken StoryCloze", notes=notes,
                                      settings={"data": str(data), "models": [str(m) for m in args.model],
                                                "settings": settings, "n": len(records),
                                                "speech_export": args.speech_export})
    print(md_path.read_text(encoding="utf-8"))
    return {"summary": rows, "json": str(json_path), "markdown": str(md_path)}
