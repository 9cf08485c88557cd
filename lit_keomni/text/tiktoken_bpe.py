"""GLM-4's tiktoken vocabulary (`tokenizer.model`) as a Hugging Face `tokenizers` byte-level BPE, and back.

GLM-4-9B and glm-4-voice-9b ship their text vocabulary as tiktoken ranks: one line per token, the token's bytes in
base64 and its rank (= its id), 151,329 lines. THUDM's remote code (`tokenization_chatglm.py`, `ChatGLM4Tokenizer`)
builds a `tiktoken.Encoding` from them with GLM-4's split regex `GLM4_PAT_STR`; the special tokens (`<|endoftext|>`,
`[gMASK]`, `<sop>`, `<|user|>`, ... and glm-4-voice-9b's `<|audio_N|>`) are numbered after the ranks, listed in
`tokenizer_config.json` under `added_tokens_decoder` (older copies of the remote code number `GLM4_SPECIAL_TOKENS`
after the ranks themselves, with the same ids).

tiktoken's algorithm is byte-pair merging where the pair to merge next is the adjacent pair whose concatenation has
the lowest rank, and a pre-token that is itself a token is emitted whole. That is exactly a `tokenizers` BPE whose merge
list is ordered by the rank of the merged token, with `ignore_merges=True` (the whole-word shortcut). The merge that
makes a token is found by running the same merging on the token's own bytes until two parts are left: those two are
the merge (transformers' `TikTokenConverter` derives Llama-3's merges from its ranks in the same spirit).
Tokens are written in the GPT-2 byte-to-unicode alphabet that `pre_tokenizers.ByteLevel` uses, so one
`tokenizers.Tokenizer` (fast batch encoding, a `tokenizer.json` that `PreTrainedTokenizerFast` reads) gives the ids
tiktoken gives, and `ranks_from_vocab` turns its vocabulary back into the released file.
"""

from __future__ import annotations

import base64
import binascii
import itertools
from pathlib import Path
from typing import Mapping, Sequence

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

GLM4_PAT_STR = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
"""GLM-4's pre-tokenisation regex (`pat_str` of `ChatGLM4Tokenizer`; the same as Llama-3's): contractions, letter runs
with one leading non-letter, up to 3 digits, punctuation runs, newlines, and spaces that stay before the next word."""

GLM4_SPECIAL_TOKENS = (
    "<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>", "<|assistant|>",
    "<|observation|>", "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>", "<|end_of_video|>",
)
"""GLM-4's special tokens in id order, numbered from the number of ranks (151,329 in glm-4-9b)."""

GLM4_PREFIX = ("[gMASK]", "<sop>")
"""What `ChatGLM4Tokenizer` puts before every text encoded with special tokens (`get_prefix_tokens`)."""


def byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character map (what `pre_tokenizers.ByteLevel` writes a byte as).

    Printable Latin-1 bytes stand for themselves; the other 68 bytes (controls, space, ...) map to 256, 257, ... in
    byte order, so every byte string becomes a string with no whitespace or control characters.
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    out = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in out:
            out[b] = chr(256 + extra)
            extra += 1
    return out


_TO_CHAR = byte_alphabet()
_TO_BYTE = {c: b for b, c in _TO_CHAR.items()}


def token_text(token: bytes) -> str:
    """A token's bytes in the byte-level alphabet, e.g. b" the" -> "Ġthe"."""
    return "".join(_TO_CHAR[b] for b in token)


def token_bytes(text: str) -> bytes:
    """Inverse of `token_text`."""
    return bytes(_TO_BYTE[c] for c in text)


def read_ranks(path: str | Path) -> dict[bytes, int]:
    """The ranks of a tiktoken file: `base64(token) rank` per line, ranks 0..n-1 each once (the ids GLM-4 uses).

    Raises ValueError naming the file and line for a malformed line, a repeated token or rank, or ranks with a gap,
    and when a single byte is missing (a byte-level BPE must spell every byte string).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tiktoken vocabulary not found: {path}")
    ranks: dict[bytes, int] = {}
    seen: dict[int, int] = {}
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            fields = raw.split()
            try:
                if len(fields) != 2:
                    raise ValueError("expected 2 fields")
                token, rank = base64.b64decode(fields[0], validate=True), int(fields[1])
            except (ValueError, binascii.Error) as err:
                text = raw.decode("utf-8", errors="replace").rstrip()
                raise ValueError(f"{path}: line {lineno} is not 'base64-token rank' ({err}): {text[:80]!r}") from err
            if token in ranks:
                raise ValueError(f"{path}: line {lineno}: token {token!r} already has rank {ranks[token]}")
            if rank in seen:
                raise ValueError(f"{path}: line {lineno}: rank {rank} already given on line {seen[rank]}")
            ranks[token] = rank
            seen[rank] = lineno
    if not ranks:
        raise ValueError(f"{path}: no 'base64-token rank' lines")
    missing_rank = next((r for r in range(len(ranks)) if r not in seen), None)
    if missing_rank is not None:
        raise ValueError(f"{path}: ranks must be 0..{len(ranks) - 1} without gaps (they are the token ids), "
                         f"rank {missing_rank} is missing")
    missing_byte = next((b for b in range(256) if bytes([b]) not in ranks), None)
    if missing_byte is not None:
        raise ValueError(f"{path}: byte 0x{missing_byte:02x} has no rank; a byte-level BPE needs all 256 single bytes")
    return ranks


def write_ranks(ranks: Mapping[bytes, int], path: str | Path) -> Path:
    """Write `ranks` in tiktoken's format, in rank order (the released file's layout); returns `path`."""
    path = Path(path)
    lines = [f"{base64.b64encode(t).decode('ascii')} {r}\n" for t, r in sorted(ranks.items(), key=lambda kv: kv[1])]
    path.write_text("".join(lines), encoding="ascii")
    return path


def _merge_of(token: bytes, ranks: Mapping[bytes, int]) -> tuple[bytes, bytes] | None:
    """The last merge tiktoken makes when `token`'s bytes form `token`: merge the lowest-ranked adjacent pair until
    two parts are left. None if the merging gets stuck first (tiktoken then emits `token` only as a whole pre-token).

    Inside a longer pre-token the bytes of `token` go through the same merges in the same order (a merge with a byte
    outside would make a token that is no part of `token`), so this one pair per token reproduces tiktoken. The parts
    may have higher ranks than `token` itself; the BPE applies them first all the same, since a merge only becomes a
    candidate once both parts exist.
    """
    parts = [token[i:i + 1] for i in range(len(token))]
    while len(parts) > 2:
        best, at = None, -1
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and (best is None or r < best):
                best, at = r, i
        if best is None:
            return None
        parts[at:at + 2] = [parts[at] + parts[at + 1]]
    return (parts[0], parts[1]) if len(parts) == 2 else None


def ranks_to_bpe(ranks: Mapping[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) of the `tokenizers` BPE equivalent to tiktoken `ranks` (see the module docstring): one merge
    per multi-byte token (`_merge_of`), ordered by the token's rank, which is its priority in tiktoken."""
    vocab = {token_text(t): r for t, r in ranks.items()}
    merges: list[tuple[int, str, str]] = []
    for token, rank in ranks.items():
        pair = _merge_of(token, ranks) if len(token) > 1 else None
        if pair is not None:
            merges.append((rank, token_text(pair[0]), token_text(pair[1])))
    merges.sort()
    return vocab, [(a, b) for _, a, b in merges]


def ranks_from_vocab(vocab: Mapping[str, int]) -> dict[bytes, int]:
    """tiktoken ranks of a byte-level BPE vocabulary (`tokenizers` model vocab, without added tokens)."""
    return {token_bytes(t): i for t, i in vocab.items()}


def tiktoken_tokenizer(ranks: Mapping[bytes, int], added: Sequence[tuple[int, AddedToken]],
                       pat_str: str = GLM4_PAT_STR, source: str = "ranks") -> Tokenizer:
    """A `tokenizers.Tokenizer` giving tiktoken's ids for `ranks` split by `pat_str`, with the `added` (id, token)
    tokens, which must take the ids right after the ranks (`tokenizers` numbers added tokens consecutively, so a gap
    or a collision is a ValueError naming `source`).

    When GLM-4's `[gMASK]` and `<sop>` are among them, `encode(..., add_special_tokens=True)` prepends them, as
    `ChatGLM4Tokenizer.build_inputs_with_special_tokens` does.
    """
    vocab, merges = ranks_to_bpe(ranks)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pat_str), behavior="isolated"),
        # use_regex=False: the split above is the only segmentation; ByteLevel only maps bytes to its alphabet.
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    added = sorted(added, key=lambda it: it[0])
    for expected, (idx, token) in enumerate(added, start=len(ranks)):
        if idx != expected:
            raise ValueError(f"{source}: added token {token.content!r} has id {idx}, but ids must follow the "
                             f"{len(ranks)} ranks without gaps (expected {expected})")
    # One call per run of equal `special` flags, which keeps the ids in order: each call rebuilds the matcher, and
    # glm-4-voice-9b has 16k added tokens.
    for special, run in itertools.groupby((t for _, t in added), key=lambda t: t.special):
        (tok.add_special_tokens if special else tok.add_tokens)(list(run))
    ids = {t.content: i for i, t in added}
    if all(t in ids for t in GLM4_PREFIX):
        tok.post_processor = processors.TemplateProcessing(
            single=" ".join([*GLM4_PREFIX, "$A"]), special_tokens=[(t, ids[t]) for t in GLM4_PREFIX])
    return tok
