"""Spoken question answering (GLM-4-Voice §3.1 "Spoken Question Answering", Appendix C; Table 3): a spoken question
in, a text answer (``S→T``) or a spoken answer (``S``) out, scored by whether an accepted answer occurs in it.

    python -m lit_keomni eval spoken-qa --model checkpoints/stage3/export --model checkpoints/stage4/export \
        --builtin --out eval/spoken_qa

How each model answers (greedy decoding; the question is its speech tokens from the model's stage-1 export):
- ``speech_lm``, stage 3 (``pretrain``): ``<|begin_of_audio|> question <|end_of_audio|> the answer is`` (Appendix C;
  "答案是" for Chinese questions). ``S→T``: up to ``--max-new-tokens`` (128) text tokens, stopping at ``<|eos|>`` or
  ``<|begin_of_audio|>``. ``S``: the prompt gets ``<|begin_of_audio|>`` and the model writes up to
  ``--max-speech-seconds`` (10 s = 125 tokens at 12.5 Hz) of speech tokens, stopping at ``<|end_of_audio|>``.
- ``speech_lm``, stage 4 discrete SFT: the GLM-4-Voice dialogue prompt of its template (Appendix F). ``text_guided``:
  the text up to ``\\n<|assistant|>`` is the ``S→T`` answer, and the speech tokens it then writes after
  ``\\n<|assistant|>\\n<|begin_of_audio|>`` the ``S`` answer. ``direct``: speech only (``S``). ``streaming`` (the
  released glm-4-voice-9b's): one interleaved answer up to ``<|user|>``; its text is ``S→T``, its speech ``S``.
- ``keomni_lm`` (stage 4 continuous, KE-Omni): its ``respond`` gives the text answer (``S→T`` only).
Spoken answers are read back by the stage-1 ASR decoder (the paper uses whisper-large-v3 for this).

Scoring: both sides pass through ``eval.asr.normalize``; an answer counts when an accepted string occurs in the
response as whole words (English) or as a substring (Chinese, where a number must not run on into more numerals:
"十" does not match "十五"). The chance level is the mean over items of 1 / number of candidate values (e.g. 1/11 for
a favourite colour), when the data lists candidates. Data: a JSONL of ``{question_audio, answers, language}`` and
optionally ``question_text``, ``candidates``; or ``--builtin`` (``eval.builtin.build_qa_set``).
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from lit_keomni.audio import SAMPLE_RATE
from lit_keomni.eval.asr import language_family, normalize
from lit_keomni.eval.builtin import build_qa_set
from lit_keomni.eval.lm_scoring import (SpeechLM, Stage1Speech, add_common_arguments, audio_path, by_language,
                                        export_kind, load_speech_lm, read_records, stage1_for)
from lit_keomni.eval.report import write_report
from lit_keomni.generate import generate
from lit_keomni.nn.audio import load_wav
from lit_keomni.text.templates import (ASSISTANT, BEGIN_AUDIO, END_AUDIO, SYSTEM, USER, Exchange, glm_dialogue,
                                      split_answer)

SETTINGS = ("S", "S→T")
ALIASES = {"S": "S", "S2T": "S→T", "S→T": "S→T"}
ANSWER_PROMPT = {"en": "the answer is", "zh": "答案是"}
"""Text after the spoken question for a pretrained model (Appendix C)."""
COLUMNS = ("model", "stage", "setting", "accuracy", "en", "zh", "chance", "n")
_ZH_NUMERALS = frozenset("零一二三四五六七八九十百千万两")


# ---------------------------------------------------------------------------------------------------- scoring
def is_correct(response: str, answers: Sequence[str], language: str) -> bool:
    """True when an accepted answer occurs in ``response`` after normalisation (see the module docstring)."""
    family = language_family(language)
    text = normalize(response, family)
    for answer in answers:
        a = normalize(answer, family)
        if not a:
            continue
        if family == "en":
            if re.search(rf"(?<!\S){re.escape(a)}(?!\S)", text):
                return True
            continue
        for m in re.finditer(re.escape(a), text):
            before = text[m.start() - 1] if m.start() > 0 else ""
            after = text[m.end()] if m.end() < len(text) else ""
            if (a[0] in _ZH_NUMERALS and before in _ZH_NUMERALS) or (a[-1] in _ZH_NUMERALS and after in _ZH_NUMERALS):
                continue
            return True
    return False


def chance_level(candidates: Sequence[Sequence[str]]) -> float:
    """Mean over items of 1 / number of candidates: the accuracy of guessing one candidate value at random."""
    if not candidates or any(len(c) == 0 for c in candidates):
        raise ValueError("chance_level: every item needs at least one candidate")
    return sum(1.0 / len(c) for c in candidates) / len(candidates)


# ---------------------------------------------------------------------------------------------------- answering
def _batched_generate(lm: SpeechLM, prompts: list[list[int]], batch_size: int, **kw: Any) -> list[list[int]]:
    out: list[list[int]] = []
    for i in range(0, len(prompts), batch_size):
        out += generate(lm.model, prompts[i: i + batch_size], temperature=0.0, pad_id=lm.tokenizer.pad_id, **kw)
    return out


def supported_settings(kind: str, lm: SpeechLM | None) -> tuple[str, ...]:
    """The settings a model can answer in: a ``direct`` SFT model speaks only, a KE-Omni model writes only."""
    if kind == "keomni_lm":
        return ("S→T",)
    return ("S",) if lm is not None and lm.template == "direct" else SETTINGS


def answer_speech_lm(lm: SpeechLM, speech: Stage1Speech, questions: Sequence[Sequence[int]], languages: Sequence[str],
                     settings: Sequence[str], *, max_new_tokens: int = 128, max_speech_seconds: float = 10.0,
                     batch_size: int = 16) -> dict[str, list[dict[str, Any]]]:
    """Answers of a ``speech_lm`` to spoken questions (speech-token indices), per setting: ``{"response", ...}`` per
    question; a spoken answer also gives its ``speech_tokens`` count."""
    tok = lm.tokenizer
    boa, eoa, eos = tok.token_to_id(BEGIN_AUDIO), tok.token_to_id(END_AUDIO), tok.eos_id
    text_ids = (0, tok.token_to_id(SYSTEM))  # text tokens precede the role and speech tokens
    speech_ids = (tok.audio_token_offset, tok.audio_token_offset + tok.num_audio_tokens)
    max_speech = max(1, round(max_speech_seconds * lm.frame_rate_hz))
    out: dict[str, list[dict[str, Any]]] = {}
    if lm.stage == "pretrain":
        prompts = [[boa, *tok.speech_to_ids(q), eoa, *tok.encode(ANSWER_PROMPT[language_family(lang)])]
                   for q, lang in zip(questions, languages)]
        if "S→T" in settings:
            ids = _batched_generate(lm, prompts, batch_size, max_new_tokens=max_new_tokens, stop_ids=[eos, boa],
                                    allowed_ids=text_ids)
            out["S→T"] = [{"response": tok.decode(i).strip()} for i in ids]
        speech_prompts = [[*p, boa] for p in prompts]
    elif lm.template == "streaming":  # text and speech interleaved in one answer, ended by <|user|>
        prompts = [glm_dialogue(tok, [Exchange(user_codes=q)], "streaming")[0] for q in questions]
        ids = _batched_generate(lm, prompts, batch_size, max_new_tokens=max_new_tokens + max_speech,
                                stop_ids=[tok.token_to_id(USER), eos], allowed_ids=(0, speech_ids[1]))
        parts = [split_answer(tok, i) for i in ids]
        if "S→T" in settings:
            out["S→T"] = [{"response": tok.decode(t).strip()} for t, _ in parts]
        if "S" in settings:
            heard = speech.transcribe([c for _, c in parts], batch_size=batch_size)
            out["S"] = [{"response": h, "speech_tokens": len(c)} for h, (_, c) in zip(heard, parts)]
        return out
    else:
        texts: list[str] = []
        if lm.template == "text_guided":
            prompts = [glm_dialogue(tok, [Exchange(user_codes=q)], "text_guided")[0] for q in questions]
            ids = _batched_generate(lm, prompts, batch_size, max_new_tokens=max_new_tokens,
                                    stop_ids=[eos, boa, tok.token_to_id(ASSISTANT)], allowed_ids=text_ids)
            texts = [tok.decode(i).strip() for i in ids]
            if "S→T" in settings:
                out["S→T"] = [{"response": t} for t in texts]
        # The template with an empty speech answer, its <|end_of_audio|> dropped: the prompt ends at <|begin_of_audio|>.
        speech_prompts = [glm_dialogue(tok, [Exchange(user_codes=q, text=t, codes=[])], lm.template)[0][:-1]
                          for q, t in zip(questions, texts or [None] * len(questions))]
    if "S" in settings:
        ids = _batched_generate(lm, speech_prompts, batch_size, max_new_tokens=max_speech, stop_ids=[eoa],
                                allowed_ids=speech_ids)
        codes = [tok.ids_to_speech(i) for i in ids]
        heard = speech.transcribe(codes, batch_size=batch_size)
        out["S"] = [{"response": h, "speech_tokens": len(c)} for h, c in zip(heard, codes)]
    return out


def answer_keomni(path: str | Path, wavs: Sequence[Path], *, max_new_tokens: int, batch_size: int,
                  device: str) -> list[dict[str, Any]]:
    """Text answers of a KE-Omni export (``keomni_lm``) to the question audio files."""
    try:
        from lit_keomni.checkpoints import load_keomni
    except ImportError:
        raise ValueError(f"{path}: a 'keomni_lm' export needs lit_keomni.checkpoints.load_keomni (stage 4 "
                         "continuous), which this installation lacks") from None
    model, tokenizer, _ = load_keomni(path, answers=True)
    model.to(device)
    out: list[dict[str, Any]] = []
    with torch.inference_mode():
        for i in range(0, len(wavs), batch_size):
            audio = [torch.from_numpy(load_wav(p, SAMPLE_RATE)[0]).to(device) for p in wavs[i: i + batch_size]]
            out += [{"response": r.strip()} for r in model.respond(tokenizer, audio, max_new_tokens=max_new_tokens)]
    return out


# ---------------------------------------------------------------------------------------------------- command
def read_questions(data: Path, limit: int | None = None) -> list[dict[str, Any]]:
    """The QA records of ``data`` (first ``limit``), checked: non-empty accepted answers, candidates if given."""
    records = read_records(data, ["question_audio"], limit)
    for r in records:
        where = f"{data}: record {r['id']!r}"
        answers = r.get("answers")
        if (not isinstance(answers, list) or not answers
                or not all(isinstance(a, str) and normalize(a, r["language"]) for a in answers)):
            raise ValueError(f"{where}: field 'answers' must be a non-empty list of answers with letters or digits")
        if "candidates" in r and (not isinstance(r["candidates"], list) or not r["candidates"]):
            raise ValueError(f"{where}: field 'candidates' must be a non-empty list")
    return records


def summary_row(model: str, stage: str, setting: str, results: Sequence[Mapping[str, Any]],
                chance: float | None) -> dict[str, Any]:
    langs = by_language([(r["language"], float(r["correct"])) for r in results])
    row = {"model": model, "stage": stage, "setting": setting,
           "accuracy": 100.0 * sum(r["correct"] for r in results) / len(results), **langs}
    if chance is not None:
        row["chance"] = 100.0 * chance
    return {**row, "n": len(results)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser, "spoken-qa", "questions",
                         "speech_lm (stage 3/4 discrete) or keomni_lm (stage 4 continuous) export folder",
                         "{question_audio, answers: [accepted], language} and optionally question_text, candidates")
    parser.add_argument("--settings", nargs="+", choices=sorted(ALIASES), default=None,
                        help="S (spoken answer), S2T (S→T, text answer); default both where the model supports them")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="text tokens of an S→T answer (paper: 128)")
    parser.add_argument("--max-speech-seconds", type=float, default=10.0, help="length of an S answer (paper: 10 s)")


def run(args: argparse.Namespace) -> dict[str, Any]:
    data = Path(args.data) if args.data else build_qa_set(Path(args.out) / "builtin_spoken_qa", args.n_per_language,
                                                          args.seed)
    records = read_questions(data, args.limit)
    asked = list(dict.fromkeys(ALIASES[s] for s in args.settings)) if args.settings else list(SETTINGS)
    languages = [r["language"] for r in records]
    wavs = [audio_path(data, r, "question_audio") for r in records]
    chance = chance_level([r["candidates"] for r in records]) if all("candidates" in r for r in records) else None
    rows: list[dict[str, Any]] = []
    details: list[dict[str, Any]] = []
    skipped: list[str] = []
    stage1: dict[Path, Stage1Speech] = {}
    for path in args.model:
        kind = export_kind(path)
        if kind not in ("speech_lm", "keomni_lm"):
            raise ValueError(f"{Path(path) / 'config.json'}: field 'kind' is {kind!r}; spoken-qa answers with a "
                             "'speech_lm' or 'keomni_lm' export")
        lm = load_speech_lm(path, args.speech_export, args.device) if kind == "speech_lm" else None
        settings = [s for s in asked if s in supported_settings(kind, lm)]
        skipped += [f"{path}: {s}" for s in asked if s not in settings]
        if not settings:
            continue
        if lm is None:
            answers = {"S→T": answer_keomni(path, wavs, max_new_tokens=args.max_new_tokens,
                                            batch_size=args.batch_size, device=args.device)}
            stage = "sft (keomni)"
        else:
            speech = stage1_for(lm, stage1, args.device)
            questions = speech.encode_files(wavs, args.batch_size)
            answers = answer_speech_lm(lm, speech, questions, languages, settings,
                                       max_new_tokens=args.max_new_tokens, max_speech_seconds=args.max_speech_seconds,
                                       batch_size=args.batch_size)
            stage = lm.label
        for setting in settings:
            results = [{"model": str(path), "setting": setting, "id": r["id"],
                        "language": r["language"], "question": r.get("question_text", ""), "answers": r["answers"],
                        **a, "correct": is_correct(a["response"], r["answers"], r["language"])}
                       for r, a in zip(records, answers[setting])]
            rows.append(summary_row(str(path), stage, setting, results, chance))
            details += results
    notes = ("Accuracy (%): an accepted answer occurs in the normalised response (English: whole words; Chinese: "
             "substring). S: spoken answer read back by the stage-1 ASR decoder; S→T: text answer "
             "(GLM-4-Voice Table 3). Chance: mean of 1 / number of candidate values.")
    if skipped:
        notes += "\n\nNot supported by the model (∅): " + "; ".join(skipped) + "."
    json_path, md_path = write_report(args.out, "spoken-qa", rows, items=details, columns=COLUMNS,
                                      title="Spoken question answering", notes=notes,
                                      settings={"data": str(data), "models": [str(m) for m in args.model],
                                                "settings": asked, "n": len(records), "chance": chance,
                                                "max_new_tokens": args.max_new_tokens,
                                                "max_speech_seconds": args.max_speech_seconds,
                                                "speech_export": args.speech_export})
    print(md_path.read_text(encoding="utf-8"))
    return {"summary": rows, "json": str(json_path), "markdown": str(md_path)}
