"""``judge`` eval task: Speech-to-Text Instruction-Following (S2TIF) scores from an LLM judge (KE-Omni §5.3, Table 8,
Appendix A.2 prompt, after LLaMA-Omni; GLM-4-Voice §3.1 scores its chatbot with GPT-4 the same way).

    python -m lit_keomni eval judge --input responses.jsonl --judge-url http://127.0.0.1:8000/v1 --judge-model gpt-4o

Each record ``{"instruction", "response"[, "id", "language"]}`` (the transcribed user instruction and the model's
response transcript) is sent in the A.2 prompt to an OpenAI-compatible chat-completions endpoint, which answers
``{"content": 1-5, "style": 1-5}``. Reports mean content and style scores and the mean response length (characters
for Mandarin, words for English, as Table 8 shows it), overall and per language; every reply is kept in
``OUT/judge.json``. Standard library HTTP only; the API key comes from ``--api-key`` or ``OPENAI_API_KEY``.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import time
import unicodedata
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from lit_keomni.eval.asr import language_family
from lit_keomni.eval.report import read_jsonl, write_report

S2TIF_PROMPT = """I'need your help to evaluate the performance of several models in the speech interaction scenario. The models will receive a speech input from the user, which they need to understand and respond to with a speech output. Your task is to rate the model’s responses based on the provided user input transcription [Instruction] and the model’s output transcription [Response]. Please evaluate the response from two perspectives: content and style, and provide a score for each on a scale of 1 to 5.

Content (1-5 points):

1 point: The response is largely irrelevant, incorrect, or fails to address the user’s query. It may be off-topic or provide incorrect information.

2 points: The response is somewhat relevant but lacks accuracy or completeness. It may only partially answer the user’s question or include extraneous information.

3 points: The response is relevant and mostly accurate, but it may lack conciseness or include unnecessary details that don’t contribute to the main point.

4 points: The response is relevant, accurate, and concise, providing a clear answer to the user’s question without unnecessary elaboration.

5 points: The response is exceptionally relevant, accurate, and to the point. It directly addresses the user’s query in a highly effective and efficient manner, providing exactly the information needed.

Style (1-5 points):

1 point: The response is poorly suited for speech interaction, possibly including structured elements like lists or being overly complex, disjointed, or difficult to understand.

2 points: The response is somewhat suitable but may be too long, too short, or awkwardly phrased, making it less effective in a speech interaction context.

3 points: The response is generally suitable for speech interaction, but it may have minor issues with length, clarity, or fluency that detract slightly from the overall effectiveness.

4 points: The response is well-suited for speech interaction, with appropriate length, clear language, and a natural flow. It is easy to understand when spoken aloud.

5 points: The response is perfectly suited for speech interaction. It is the ideal length, highly clear, and flows naturally, making it easy to follow and understand when spoken.

Below are the transcription of user’s instruction and models’ response:
### [Instruction]: {instruction}
### [Reponse]: {response}
After evaluating, please output the scores in JSON format: {"content": content score, "style": style score}.
You don’t need to provide any explanations."""
"""KE-Omni Appendix A.2, character for character as the paper prints it ("I'need", curly apostrophes, the
"[Reponse]" typo) with only the PDF's line wraps joined."""

_FENCE = re.compile(r"```(?:json|JSON)?\s*(.*?)```", re.S)
_OBJECT = re.compile(r"\{[^{}]*\}", re.S)
_HAN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")


class JudgeError(ValueError):
    """The judge endpoint could not be reached or gave a reply that holds no usable scores."""


def judge_prompt(instruction: str, response: str) -> str:
    """The A.2 prompt with one instruction and response filled in (plain replacement: the prompt's own JSON braces stay)."""
    return S2TIF_PROMPT.replace("{instruction}", instruction).replace("{response}", response)


def parse_scores(reply: str) -> dict[str, float]:
    """``{"content", "style"}`` from a judge reply: the first JSON object (inside a code fence if there is one) whose
    "content" and "style" are numbers (or numeric strings) from 1 to 5. ValueError saying what is wrong otherwise."""
    fenced = _FENCE.search(reply)
    problem = "no JSON object"
    for candidate in _OBJECT.findall(fenced.group(1) if fenced else reply):
        try:
            obj = json.loads(candidate)
        except json.JSONDecodeError:
            problem = f"invalid JSON {candidate[:80]!r}"
            continue
        scores = {}
        for key in ("content", "style"):
            value = obj.get(key)
            if isinstance(value, str):
                try:
                    value = float(value.strip())
                except ValueError:
                    pass
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 1 <= value <= 5:
                problem = f"field {key!r} is {obj.get(key)!r}, not a score from 1 to 5"
                break
            scores[key] = float(value)
        else:
            return scores
    raise ValueError(problem)


def response_length(text: str, language: str) -> int:
    """Length of a response as KE-Omni Table 8 counts it: Mandarin in characters (punctuation and spaces excluded),
    English in words."""
    if language == "zh":
        return sum(1 for c in text if not c.isspace() and not unicodedata.category(c).startswith("P"))
    return len(text.split())


def chat_completion(url: str, model: str, prompt: str, *, api_key: str | None = None, temperature: float = 0.0,
                    timeout: float = 120.0, retries: int = 4, backoff: float = 2.0) -> str:
    """The reply text of one user message to an OpenAI-compatible ``{url}/chat/completions``.

    Connection errors, broken replies, time-outs, HTTP 429 and 5xx are retried up to ``retries`` times after ``backoff · 2^k``
    seconds; any other HTTP error, or a reply without ``choices[0].message.content``, raises ``JudgeError``."""
    endpoint = url.rstrip("/")
    if not endpoint.endswith("/chat/completions"):
        endpoint += "/chat/completions"
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": prompt}],
                       "temperature": temperature}).encode()
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    for attempt in range(retries + 1):
        try:
            with urllib.request.urlopen(urllib.request.Request(endpoint, body, headers), timeout=timeout) as r:
                raw = r.read()
            break
        except urllib.error.HTTPError as e:
            detail = e.read()[:300].decode("utf-8", "replace")
            if e.code != 429 and e.code < 500:
                raise JudgeError(f"{endpoint}: HTTP {e.code} {e.reason}: {detail}") from None
            failure = f"HTTP {e.code} {e.reason}: {detail}"
        except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError) as e:
            failure = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
        if attempt == retries:
            raise JudgeError(f"{endpoint}: no reply after {retries + 1} tries; last: {failure}")
        time.sleep(backoff * 2**attempt)
    try:
        return json.loads(raw)["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise JudgeError(f"{endpoint}: not a chat-completions reply: {raw[:300].decode('utf-8', 'replace')!r}") from None


def judge_item(item: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Scores of one record; JudgeError naming the item when the reply is unusable."""
    reply = chat_completion(args.judge_url, args.judge_model, judge_prompt(item["instruction"], item["response"]),
                            api_key=args.api_key, temperature=args.temperature, timeout=args.timeout,
                            retries=args.retries, backoff=args.backoff)
    try:
        scores = parse_scores(reply)
    except ValueError as e:
        raise JudgeError(f"judge reply for item {item['id']!r} is unusable ({e}): {reply[:300]!r}") from None
    return {**item, **scores, "reply": reply}


def _row(language: str, items: list[dict[str, Any]], length: bool) -> dict[str, Any]:
    n = len(items)
    return {"language": language, "items": n, "Content": sum(i["content"] for i in items) / n,
            "Style": sum(i["style"] for i in items) / n,
            "Length": sum(i["length"] for i in items) / n if length else ""}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", required=True, help='JSONL of {"instruction", "response"[, "id", "language"]}')
    parser.add_argument("--judge-url", required=True, help="OpenAI-compatible API base, e.g. http://127.0.0.1:8000/v1")
    parser.add_argument("--judge-model", default="gpt-4o", help="model name sent to the endpoint (KE-Omni: GPT-4o)")
    parser.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"),
                        help="bearer token (default: $OPENAI_API_KEY; none if unset)")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    parser.add_argument("--retries", type=int, default=4, help="retries on connection errors, 429 and 5xx")
    parser.add_argument("--backoff", type=float, default=2.0, help="first retry delay in seconds, doubled each time")
    parser.add_argument("--workers", type=int, default=4, help="requests in flight at once")
    parser.add_argument("--limit", type=int, default=None, help="only the first N records")
    parser.add_argument("--out", default="reports", help="report folder: judge.json, judge.md (default: reports)")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Judge every record, write the report; returns {"summary", "json", "markdown"}."""
    items = read_jsonl(args.input, ["instruction", "response"])[: args.limit]
    for item in items:
        if "language" in item:
            try:
                item["language"] = language_family(str(item["language"]))
            except ValueError as e:
                raise ValueError(f"{args.input} item {item['id']!r}: field 'language': {e}") from None
        else:
            item["language"] = "zh" if _HAN.search(item["response"]) else "en"
        item["length"] = response_length(item["response"], item["language"])
    pool = ThreadPoolExecutor(max(1, args.workers))
    try:
        futures = [pool.submit(judge_item, it, args) for it in items]
        items = [f.result() for f in futures]
    finally:
        pool.shutdown(cancel_futures=True)  # after a failure, requests not yet sent are dropped
    languages = sorted({it["language"] for it in items})
    rows = [_row("all", items, length=len(languages) == 1)]
    rows += [_row(lang, [it for it in items if it["language"] == lang], length=True) for lang in languages]
    settings = {"input": str(args.input), "judge_url": args.judge_url, "judge_model": args.judge_model,
                "temperature": args.temperature, "limit": args.limit, "prompt": S2TIF_PROMPT}
    json_path, md_path = write_report(
        args.out, "judge", rows, settings=settings, items=items, title="S2TIF (LLM judge)",
        notes=f"Judge: {args.judge_model}, KE-Omni Appendix A.2 prompt; Content and Style 1-5, higher is better; "
              "Length: mean response length, characters (zh) or words (en).")
    print(f"judge: {json_path}\n{md_path.read_text()}")
    return {"summary": rows, "json": str(json_path), "markdown": str(md_path)}
