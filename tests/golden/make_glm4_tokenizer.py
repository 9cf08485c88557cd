"""Golden ids of GLM-4's reference tokenizer (`ChatGLM4Tokenizer`, THUDM's remote code) on a small vocabulary.

Writes `tests/golden/glm4_tokenizer/`:
  tokenizer.model        a GLM-4-style tiktoken vocabulary: the 256 single bytes, then the merges a plain byte-pair
                         trainer (below) learns from a bilingual text split by GLM-4's regex, one `base64 rank` per line
  tokenizer_config.json  the released glm-4-9b-chat / glm-4-voice-9b shape: `added_tokens_decoder` numbering GLM-4's 14
                         special tokens after the ranks, then <|begin_of_audio|>, <|end_of_audio|> and 64 <|audio_N|>
  reference.json         what the reference tokenizer returns for each test text: ids with and without the
                         `[gMASK]<sop>` prefix, its decode, and its ids/eos/pad/vocabulary size

Reference code: `tokenization_chatglm.py` of THUDM/glm-4-9b-chat (the version with `special_tokens={}` that reads the
special tokens from tokenizer_config.json, as glm-4-voice-9b does), taken from the copy stored in GitHub repository
Pyrojewel-zard/gpt_academic, path THUDM/glm-4-9b-chat/tokenization_chatglm.py, commit
f79b62339ae5fc7f0013093e9148b0bc4d0d2360 (a ModelScope download of the model repo, 8,987 characters). Run, outside
this repository:

    python -m venv --system-site-packages /tmp/ref_C/venv
    /tmp/ref_C/venv/bin/pip install transformers==4.44.1        # GLM-4-Voice's pin; brings tokenizers 0.19.1
    # tiktoken 0.14.0 and regex come from the system site-packages
    mkdir -p /tmp/ref_C/glm4ref  # put tokenization_chatglm.py (above) there
    /tmp/ref_C/venv/bin/python tests/golden/make_glm4_tokenizer.py /tmp/ref_C/glm4ref

The vocabulary and config are written by this script (plain Python and json); the ids come only from the reference.
"""

from __future__ import annotations

import base64
import collections
import json
import random
import sys
from pathlib import Path

import regex

OUT = Path(__file__).resolve().parent / "glm4_tokenizer"
PAT_STR = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
           r"|\s+(?!\S)|\s+")
"""pat_str of the reference (the trainer splits text as the tokenizer will)."""
GLM4_SPECIALS = ["<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
                 "<|assistant|>", "<|observation|>", "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>",
                 "<|end_of_video|>"]
NUM_AUDIO = 64
MERGES = 3000

TRAIN = """\
The quick brown fox jumps over the lazy dog. Speech recognition turns audio into text, and text to speech does the
reverse. A spoken dialogue model listens to the user and answers with its own voice, token by token, in real time.
GLM-4-Voice tokenises speech at 12.5 frames per second with a vector-quantised Whisper encoder; the language model
interleaves text and speech tokens, and a flow-matching decoder turns the tokens back into a waveform.
It's a small world: we've seen it, they'd say, and I'll tell you what I'm doing. Don't worry, you're fine.
In 2024 the model was trained on 1,000,000 hours of audio and 1 trillion tokens of text; 30% of the data was text.
今天天气很好，我们去公园散步吧。语音识别把声音变成文字，语音合成把文字变成声音。北京是中国的首都，上海是最大的城市。
我用手机听播客学习英语，每天三十分钟。这个模型可以听懂中文和英文，也可以用自然的声音回答问题。
请问你叫什么名字？我是一个语音助手，很高兴认识你！我们一起学习吧。春天来了，花开了，小鸟在树上唱歌。
人工智能正在改变我们的生活：从语音助手到自动驾驶，从机器翻译到医疗诊断，越来越多的任务可以由机器完成。
"""


def synthetic_text(n_words: int, seed: int = 0) -> str:
    """Deterministic filler with many distinct words, so the trainer finds a few thousand merges: English-like words
    from syllables, numbers, and runs of Han characters drawn from the first 3,000 of the CJK block."""
    rng = random.Random(seed)
    syllables = ["ka", "to", "ri", "en", "an", "ing", "er", "th", "qu", "ou", "st", "pre", "con", "ly", "tion", "al"]
    out = []
    for _ in range(n_words):
        r = rng.random()
        if r < 0.45:
            w = "".join(rng.choice(syllables) for _ in range(rng.randint(1, 4)))
            out.append(w.capitalize() if rng.random() < 0.1 else w)
        elif r < 0.9:
            out.append("".join(chr(0x4E00 + int(rng.expovariate(1 / 400)) % 3000) for _ in range(rng.randint(1, 4))))
        else:
            out.append(str(rng.randint(0, 99999)))
    return " ".join(out)


def train_ranks(text: str, n_merges: int) -> dict[bytes, int]:
    """Byte-pair training as tiktoken's vocabularies are made: all 256 bytes, then repeatedly the most frequent adjacent
    pair within the regex pre-tokens becomes the next rank (ties broken by the larger pair, for determinism)."""
    words = collections.Counter(regex.findall(PAT_STR, text))
    pieces = {w: [bytes([b]) for b in w.encode("utf-8")] for w in words}
    ranks = {bytes([i]): i for i in range(256)}
    for _ in range(n_merges):
        stats: collections.Counter = collections.Counter()
        for w, p in pieces.items():
            for a, b in zip(p, p[1:]):
                stats[a, b] += words[w]
        if not stats:
            break
        (a, b), _ = max(stats.items(), key=lambda kv: (kv[1], kv[0]))
        ranks[a + b] = len(ranks)
        for w, p in pieces.items():
            out, i = [], 0
            while i < len(p):
                if i + 1 < len(p) and p[i] == a and p[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(p[i])
                    i += 1
            pieces[w] = out
    return ranks


TEXTS = [
    "Hello, world! This is GLM-4.",
    "今天天气很好，我们去公园散步吧。",
    "我用 iPhone 15 Pro 手机听 podcast 学习英语，每天 30 分钟。",
    "1234567890 3.14159 2024年12月6日 ¥1,299.00 -42",
    "全角：ＡＢＣ１２３！？「引号」……——　全角空格",
    "Emoji 😀👍🏽 and 中文 🇨🇳!",
    "line1\nline2\r\n\n\tindented  two  spaces   \n",
    "It's, I'LL, we've, they'd, DON'T",
    "<|user|>\n你好<|assistant|>\nHi!<|endoftext|>",
    "<|begin_of_audio|><|audio_0|><|audio_63|><|audio_7|><|end_of_audio|>好的",
    "<|audio_64|> is not a token, <|audio_12|>is",
    "[gMASK]<sop>literal prefix",
    "",
    "   leading and trailing   ",
    "鑫龘 Ω≈ç√∫ naïve café",
]


def main(ref_dir: str) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    ranks = train_ranks(TRAIN * 3 + synthetic_text(6000), MERGES)
    (OUT / "tokenizer.model").write_text(
        "".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in sorted(ranks.items(), key=lambda kv: kv[1])),
        encoding="ascii")
    added = [*GLM4_SPECIALS, "<|begin_of_audio|>", "<|end_of_audio|>", *(f"<|audio_{i}|>" for i in range(NUM_AUDIO))]
    entry = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
    config = {
        "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLM4Tokenizer", None]},
        "added_tokens_decoder": {str(len(ranks) + i): {"content": t, **entry} for i, t in enumerate(added)},
        "additional_special_tokens": GLM4_SPECIALS,
        "clean_up_tokenization_spaces": False,
        "do_lower_case": False,
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "model_max_length": 128000,
        "padding_side": "left",
        "remove_space": False,
        "tokenizer_class": "ChatGLM4Tokenizer",
    }
    text = json.dumps(config, indent=2, ensure_ascii=False) + "\n"
    (OUT / "tokenizer_config.json").write_text(text, encoding="utf-8")

    sys.path.insert(0, ref_dir)
    import transformers
    from tokenization_chatglm import ChatGLM4Tokenizer

    tok = ChatGLM4Tokenizer.from_pretrained(str(OUT))
    cases = []
    for text in TEXTS:
        plain = tok.encode(text, add_special_tokens=False)
        cases.append({
            "text": text,
            "ids": tok.encode(text),
            "ids_plain": plain,
            "call_ids": tok([text])["input_ids"][0],
            "decode_skip_special": tok.decode(plain, skip_special_tokens=True),
        })
    reference = {
        "reference": "tokenization_chatglm.py of THUDM/glm-4-9b-chat via Pyrojewel-zard/gpt_academic@"
                     "f79b62339ae5fc7f0013093e9148b0bc4d0d2360 (THUDM/glm-4-9b-chat/tokenization_chatglm.py)",
        "transformers": transformers.__version__,
        "num_ranks": len(ranks),
        "vocab_size": len(tok),
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
        "bos_token_id": tok.bos_token_id,
        "token_ids": {t: tok.convert_tokens_to_ids(t) for t in added},
        "prefix": tok.get_prefix_tokens(),
        "cases": cases,
    }
    (OUT / "reference.json").write_text(json.dumps(reference, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {OUT}: {len(ranks)} ranks, {len(added)} added tokens, {len(cases)} cases")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
