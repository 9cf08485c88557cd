"""Bilingual (Mandarin + English) text tokenizer, and its extension with discrete speech tokens.

A thin layer over Hugging Face `tokenizers`:

- `TextTokenizer.train(texts)` builds a small BPE for ASR targets. Text is NFKC-normalised (full-width → half-width,
  case kept); every Han character is its own pre-token (Chinese has no spaces, so merges across characters would only
  learn corpus-specific words); punctuation is isolated; spaces become the SentencePiece marker "▁" glued to the next
  word, so English words carry a word-boundary marker and decoding restores the original spacing exactly.
  Every character seen in training is in the vocabulary; unseen ones map to `<|unk|>`.
- `TextTokenizer.from_file(path)` wraps any local `tokenizer.json` (Whisper's, Llama-3's, ...), adding our specials
  when missing (our own `tokenizer_config.json` beside it restores what `save` recorded).
- `TextTokenizer.from_folder(folder)` loads a released model's own vocabulary as the reference tokenizer reads it:
  Llama-3's / Qwen2.5's `tokenizer.json`, or GLM-4's tiktoken `tokenizer.model` (converted to an equivalent byte-level
  BPE, `lit_keomni.text.tiktoken_bpe`) with the special tokens of its `tokenizer_config.json`. The pad/bos/eos roles
  are the model's own tokens named there (GLM-4: `<|endoftext|>`; Llama-3: `<|begin_of_text|>` and `<|eot_id|>` or
  `<|end_of_text|>`; Qwen2.5: `<|im_end|>`/`<|endoftext|>`), pad falling back to eos, so nothing is appended to a
  released vocabulary unless it lacks an eos token. `save_released(folder)` writes the files back in the released
  layout, so the reference code loads a fine-tuned model's vocabulary as it loaded the original.
- `add_speech_tokens(K)` appends `<|audio_0|>` ... `<|audio_{K-1}|>` and the dialogue role tokens after every
  existing id, so a text LM's embedding rows keep their meaning when its vocabulary grows (GLM-4-Voice / KE-Omni style).
  Tokens the vocabulary already holds (glm-4-voice-9b's audio tokens, GLM-4's `<|user|>`) are used as they are.

Special token ids are never produced by `encode` unless their literal strings appear in the text (or
`add_special_tokens=True` asks for the prefix the released tokenizer adds by default).
"""

from __future__ import annotations

import json
import string
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from lit_keomni.text.tiktoken_bpe import (GLM4_SPECIAL_TOKENS, ranks_from_vocab, read_ranks, tiktoken_tokenizer,
                                          write_ranks)

PAD = "<|pad|>"
BOS = "<|bos|>"
"""Start of transcript."""
EOS = "<|eos|>"
"""End of transcript."""
UNK = "<|unk|>"
"""Only our trained BPE needs it: byte-level tokenizers (Whisper, Llama-3) can spell any text."""
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|begin_of_audio|>", "<|end_of_audio|>")
"""Dialogue markers added together with the speech tokens."""

ALWAYS_SPELLABLE = sorted(set(string.printable) - set(" \t\r\x0b\x0c"))
"""Characters every trained tokenizer holds besides those of its corpus (ASCII letters, digits, punctuation, newline)."""

CONFIG_NAME = "tokenizer_config.json"
TOKENIZER_NAME = "tokenizer.json"
TIKTOKEN_NAME = "tokenizer.model"
"""GLM-4's tiktoken vocabulary file (base64 token and rank per line)."""
RELEASED_KEY = "released"
"""Key of our tokenizer_config.json holding a released vocabulary's format and its own config, for `save_released`."""
ROLES = ("pad", "bos", "eos")
SPEECH_SLOT = PAD
"""The token of a KE-Omni speech slot (one per speech-adapter frame), added to a released vocabulary that lacks it."""


def audio_token(index: int) -> str:
    """Name of the speech token for codebook entry `index`, e.g. `<|audio_7|>`."""
    return f"<|audio_{index}|>"


def _special(content: str) -> AddedToken:
    # normalized=False: NFKC must not rewrite "<|...|>" before the added-token matcher sees it.
    return AddedToken(content, special=True, normalized=False)


class TextTokenizer:
    """A `tokenizers.Tokenizer` with pad/bos/eos roles and an optional speech vocabulary.

    `roles` maps "pad", "bos", "eos" to token strings of the vocabulary (a released model's own, see `from_folder`);
    None (our tokenizers) means `<|pad|>`, `<|bos|>`, `<|eos|>`, appended if missing (so no existing id moves; wrapping
    mutates `tokenizer`). A released vocabulary without an eos token gets `<|eos|>` appended; pad defaults to eos; bos
    may stay None. `released` (format and the released tokenizer_config.json) is what `save_released` writes back;
    `source` names the file that declares the added tokens, for error messages.
    """

    def __init__(self, tokenizer: Tokenizer, *, roles: Mapping[str, str | None] | None = None,
                 released: dict[str, Any] | None = None, source: str | None = None) -> None:
        self._tok = tokenizer
        self._released = released
        self._source = source or "tokenizer"
        if roles is None:
            roles = {"pad": PAD, "bos": BOS, "eos": EOS}
        roles = dict(roles)
        if roles.get("eos") is None:
            roles["eos"] = EOS
        if roles.get("pad") is None:
            roles["pad"] = roles["eos"] if released is not None else PAD
        self._roles: dict[str, str | None] = {r: roles.get(r) for r in ROLES}
        missing = [t for t in dict.fromkeys(self._roles.values()) if t is not None and tokenizer.token_to_id(t) is None]
        if missing:
            tokenizer.add_special_tokens([_special(t) for t in missing])
        self._num_audio = self._count_audio_tokens()

    # ---------------------------------------------------------------- constructors and persistence

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 2000, min_frequency: int = 2) -> TextTokenizer:
        """Train a bilingual BPE on `texts` (see the module docstring for the pre-tokenisation).

        `vocab_size` counts the special tokens; it is a ceiling: a small corpus yields fewer merges, and a corpus with
        more distinct characters than `vocab_size` still keeps them all (round-tripping beats the size target).
        `min_frequency` is the least count for a merge to be learned.
        """
        tok = Tokenizer(models.BPE(unk_token=UNK))
        tok.normalizer = normalizers.NFKC()
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(r"\p{Han}"), behavior="isolated"),
                pre_tokenizers.Punctuation(behavior="isolated"),
                # "first": the sentence-initial word also gets "▁", so "Hello" and " hello" share pieces; the decoder
                # strips that one leading space again. Cost: a Chinese-initial sentence starts with "▁" + char.
                pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True),
            ]
        )
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first", split=True)
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=[_special(t) for t in (PAD, BOS, EOS, UNK)],
            # limit_alphabet stays None: every training character is kept, which is what makes round-trips exact.
            # Printable ASCII and the newline are always in: prompts and dialogue templates (system prompt, "\n"
            # between turns) must be spellable even when the transcripts never use them.
            initial_alphabet=ALWAYS_SPELLABLE,
            show_progress=False,
        )
        seen = [False]

        def non_empty(items: Iterable[str]) -> Iterable[str]:
            for t in items:
                seen[0] = seen[0] or bool(t.strip())
                yield t

        tok.train_from_iterator(non_empty(texts), trainer=trainer)
        if not seen[0]:
            raise ValueError("TextTokenizer.train: `texts` holds no non-empty string")
        return cls(tok)

    @classmethod
    def from_file(cls, path: str | Path) -> TextTokenizer:
        """Load a local `tokenizer.json`; our `tokenizer_config.json` beside it (written by `save`) is checked for
        `num_audio_tokens` and restores a released vocabulary's roles. A foreign config is not read here: a bare file
        gets our pad/bos/eos (stage 1 uses Whisper's this way); `from_folder` reads a released model's roles."""
        path = Path(path)
        tok = _read_tokenizer_json(path)
        config_path = path.parent / CONFIG_NAME
        config = _read_json(config_path) if config_path.is_file() else {}
        ours = "num_audio_tokens" in config
        released = config.get(RELEASED_KEY) if ours else None
        roles = {r: config.get(f"{r}_token") for r in ROLES} if released else None
        self = cls(tok, roles=roles, released=released, source=str(path))
        # Foreign configs (Whisper, Llama-3) lack the field; only ours records the speech vocabulary.
        expected = config.get("num_audio_tokens")
        if expected is not None and expected != self._num_audio:
            raise ValueError(
                f"{config_path}: num_audio_tokens={expected} but {path} holds {self._num_audio} audio tokens"
            )
        return self

    @classmethod
    def from_folder(cls, folder: str | Path) -> TextTokenizer:
        """A released model's vocabulary from its folder, giving the ids its reference tokenizer gives.

        - `tokenizer.json` (Llama-3, Qwen2.5, transformers' GLM-4 "-hf" folders): loaded as is; pad/bos/eos are the
          tokens `tokenizer_config.json` names (`pad_token` falls back to `eos_token`).
        - GLM-4's `tokenizer.model` (used when `tokenizer_class` is `ChatGLM4Tokenizer`, or when there is no
          tokenizer.json): tiktoken ranks converted to the equivalent byte-level BPE with GLM-4's regex; the special
          tokens at the ids `added_tokens_decoder` gives them (glm-4-voice-9b's `<|audio_N|>` included), GLM-4's
          own 14 numbered after the ranks where the config omits them (as older copies of the remote code do); eos
          and pad `<|endoftext|>` unless named otherwise. `encode(text, add_special_tokens=True)` prepends
          `[gMASK]<sop>` as `ChatGLM4Tokenizer` does.
        - one of our exports (its config records `num_audio_tokens`): as `from_file`.
        """
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"tokenizer folder not found: {folder}")
        config_path, json_path, model_path = folder / CONFIG_NAME, folder / TOKENIZER_NAME, folder / TIKTOKEN_NAME
        config = _read_json(config_path) if config_path.is_file() else {}
        if model_path.is_file() and (config.get("tokenizer_class") == "ChatGLM4Tokenizer" or not json_path.is_file()):
            return cls._from_tiktoken(model_path, config, config_path)
        if not json_path.is_file():
            raise FileNotFoundError(f"{folder}: no vocabulary: expected {TOKENIZER_NAME} or {TIKTOKEN_NAME} "
                                    "(GLM-4's tiktoken ranks)")
        if not config or "num_audio_tokens" in config:
            return cls.from_file(json_path)
        tok = _read_tokenizer_json(json_path)
        roles = _config_roles(config, config_path, tok)
        return cls(tok, roles=roles, released={"format": TOKENIZER_NAME, "config": _without_added(config)},
                   source=str(json_path))

    @classmethod
    def _from_tiktoken(cls, model_path: Path, config: dict[str, Any], config_path: Path) -> TextTokenizer:
        ranks = read_ranks(model_path)
        added = _added_tokens(config, config_path, len(ranks), model_path)
        taken = {i for i, _ in added.values()}
        for i, t in enumerate(GLM4_SPECIAL_TOKENS, start=len(ranks)):
            if t not in added and i not in taken:
                added[t] = (i, _special(t))
                taken.add(i)
        tok = tiktoken_tokenizer(ranks, list(added.values()), source=str(config_path))
        roles = _config_roles(config, config_path, tok, default_eos="<|endoftext|>")
        return cls(tok, roles=roles, released={"format": TIKTOKEN_NAME, "config": _without_added(config)},
                   source=str(config_path))

    def save(self, folder: str | Path) -> Path:
        """Write `folder/tokenizer.json` and `folder/tokenizer_config.json`; return the tokenizer.json path.

        The config names the pad/bos/eos tokens in Hugging Face's keys, so `transformers.PreTrainedTokenizerFast` can
        read the folder too, and records `num_audio_tokens` for the check in `from_file`. A released vocabulary also
        keeps its format and original config under "released", so an export can be written back by `save_released`.
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / TOKENIZER_NAME
        self._tok.save(str(path))
        config: dict[str, object] = {"tokenizer_class": "PreTrainedTokenizerFast"}
        config.update({f"{r}_token": t for r, t in self._roles.items() if t is not None})
        config["num_audio_tokens"] = self._num_audio
        if self._tok.token_to_id(UNK) is not None:
            config["unk_token"] = UNK
        if self._released is not None:
            config[RELEASED_KEY] = self._released
        (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return path

    def save_released(self, folder: str | Path) -> Path:
        """Write the vocabulary in its released layout; return the vocabulary file.

        GLM-4: `tokenizer.model` (the ranks, byte-identical to the released file when no rank changed) and the
        released `tokenizer_config.json` whose `added_tokens_decoder` lists every added token at its id (appended
        speech tokens included), which `ChatGLM4Tokenizer` reads. Llama-3 / Qwen2.5: `tokenizer.json` and the
        released config, likewise. Our own tokenizers: `save`.
        """
        if self._released is None:
            return self.save(folder)
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        config = dict(self._released["config"])
        config["added_tokens_decoder"] = {
            str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized, "rstrip": t.rstrip,
                     "single_word": t.single_word, "special": t.special}
            for i, t in sorted(self._tok.get_added_tokens_decoder().items())
        }
        if self._released["format"] == TIKTOKEN_NAME:
            path = write_ranks(ranks_from_vocab(self._tok.get_vocab(with_added_tokens=False)), folder / TIKTOKEN_NAME)
        else:
            path = folder / TOKENIZER_NAME
            self._tok.save(str(path))
        (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return path

    @property
    def released_format(self) -> str | None:
        """The released file this vocabulary came from ("tokenizer.model" for GLM-4, "tokenizer.json"), or None."""
        return None if self._released is None else self._released["format"]

    # ---------------------------------------------------------------- text

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`; by default with no BOS/EOS (callers frame sequences themselves).

        `add_special_tokens=True` adds what the released tokenizer adds by default (GLM-4: `[gMASK]<sop>`; Llama-3:
        `<|begin_of_text|>`; our tokenizers and Qwen2.5: nothing). Literal special-token strings in `text`
        (`"<|user|>"`, `"<|audio_5|>"`) always become their ids, as in the reference tokenizers.
        """
        # add_special_tokens=False also disables foreign post-processors (Llama-3 prepends <|begin_of_text|>).
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = False) -> list[list[int]]:
        """`encode` for many texts, run in parallel by `tokenizers`."""
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        """Text of `ids`; `skip_special` drops pad/bos/eos/unk, role and audio tokens."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def decode_batch(self, batch: Sequence[Sequence[int]], skip_special: bool = True) -> list[str]:
        """`decode` for many id lists."""
        return self._tok.decode_batch([[int(i) for i in ids] for ids in batch], skip_special_tokens=skip_special)

    def token_to_id(self, token: str) -> int:
        """Id of `token` (e.g. `"<|user|>"`); ValueError if the vocabulary lacks it."""
        idx = self._tok.token_to_id(token)
        if idx is None:
            raise ValueError(f"token {token!r} is not in the vocabulary")
        return idx

    @property
    def pad_token(self) -> str:
        """Padding token: `<|pad|>` for ours, the model's own for a released vocabulary (its eos if it names none)."""
        return self._roles["pad"]

    @property
    def bos_token(self) -> str | None:
        """Start-of-sequence token, or None where the released vocabulary has none (GLM-4, Qwen2.5)."""
        return self._roles["bos"]

    @property
    def eos_token(self) -> str:
        """End-of-sequence token: `<|eos|>` for ours; GLM-4 `<|endoftext|>`, Llama-3 `<|eot_id|>`/`<|end_of_text|>`."""
        return self._roles["eos"]

    @property
    def pad_id(self) -> int:
        return self.token_to_id(self._roles["pad"])

    @property
    def bos_id(self) -> int:
        if self._roles["bos"] is None:
            raise ValueError(f"{self._source}: this vocabulary has no bos token (its {CONFIG_NAME} names no "
                             "'bos_token')")
        return self.token_to_id(self._roles["bos"])

    @property
    def eos_id(self) -> int:
        return self.token_to_id(self._roles["eos"])

    @property
    def vocab_size(self) -> int:
        """Number of tokens including added ones: the embedding table needs this many rows."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def backend(self) -> Tokenizer:
        """The wrapped `tokenizers.Tokenizer`, for anything this class does not cover."""
        return self._tok

    # ---------------------------------------------------------------- speech vocabulary

    def add_speech_tokens(self, codebook_size: int) -> None:
        """Append the role tokens and `codebook_size` audio tokens after every existing id, skipping those present.

        Idempotent for the same size. A vocabulary that already holds its own audio tokens (glm-4-voice-9b's
        `<|audio_0|>`...) keeps them; if their number differs from `codebook_size`, ValueError naming the file and
        both counts: the speech LM's embedding rows are tied to one codebook.
        """
        if codebook_size < 1:
            raise ValueError(f"codebook_size must be >= 1, got {codebook_size}")
        if self._num_audio not in (0, codebook_size):
            raise ValueError(
                f"{self._source}: the vocabulary already has {self._num_audio} audio tokens "
                f"({audio_token(0)}..{audio_token(self._num_audio - 1)}), but the speech tokenizer has "
                f"codebook_size={codebook_size}"
            )
        missing = [t for t in ROLE_TOKENS if self._tok.token_to_id(t) is None]
        self._tok.add_special_tokens([_special(t) for t in missing])
        if self._num_audio == 0:
            self._tok.add_special_tokens([_special(audio_token(i)) for i in range(codebook_size)])
        self._num_audio = self._count_audio_tokens()

    @property
    def num_audio_tokens(self) -> int:
        """Codebook size K of the speech vocabulary (0 before `add_speech_tokens`)."""
        return self._num_audio

    @property
    def audio_token_offset(self) -> int:
        """Id of `<|audio_0|>`; audio code c has id `audio_token_offset + c`."""
        self._require_audio()
        return self.token_to_id(audio_token(0))

    def speech_to_ids(self, codes: Sequence[int]) -> list[int]:
        """Token ids of codebook indices `codes` (each in [0, K))."""
        offset = self.audio_token_offset
        out = []
        for pos, code in enumerate(codes):
            code = int(code)
            if not 0 <= code < self._num_audio:
                raise ValueError(f"speech code {code} at position {pos} is outside [0, {self._num_audio})")
            out.append(offset + code)
        return out

    def ids_to_speech(self, ids: Sequence[int]) -> list[int]:
        """Codebook indices of audio token `ids`; ValueError on any non-audio id."""
        offset = self.audio_token_offset
        out = []
        for pos, idx in enumerate(ids):
            code = int(idx) - offset
            if not 0 <= code < self._num_audio:
                raise ValueError(
                    f"id {int(idx)} at position {pos} is not an audio token "
                    f"(audio ids are [{offset}, {offset + self._num_audio}))"
                )
            out.append(code)
        return out

    def _require_audio(self) -> None:
        if self._num_audio == 0:
            raise ValueError("tokenizer has no audio tokens; call add_speech_tokens(codebook_size) first")

    def _count_audio_tokens(self) -> int:
        """Count `<|audio_i|>` for i = 0, 1, ...; they must have consecutive ids for the offset arithmetic."""
        first = self._tok.token_to_id(audio_token(0))
        if first is None:
            return 0
        k = 1
        while (idx := self._tok.token_to_id(audio_token(k))) is not None:
            if idx != first + k:
                raise ValueError(f"{self._source}: {audio_token(k)} has id {idx}, expected {first + k}: audio ids "
                                 "must be consecutive")
            k += 1
        return k



def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _read_tokenizer_json(path: Path) -> Tokenizer:
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file not found: {path}")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises a bare Exception for malformed JSON
        raise ValueError(f"{path} is not a valid tokenizer.json: {err}") from err


def _token_field(config: Mapping[str, Any], field: str, config_path: Path) -> str | None:
    """A token named in a Hugging Face config: a string, or an AddedToken dict with "content"; None if absent."""
    value = config.get(field)
    if isinstance(value, dict):
        value = value.get("content")
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{config_path}: field '{field}' must be a token string, got {value!r}")
    return value


def _config_roles(config: Mapping[str, Any], config_path: Path, tok: Tokenizer,
                  default_eos: str | None = None) -> dict[str, str | None]:
    """pad/bos/eos of a released tokenizer_config.json; each named token must be in the vocabulary."""
    roles = {r: _token_field(config, f"{r}_token", config_path) for r in ROLES}
    roles["eos"] = roles["eos"] or default_eos
    roles["pad"] = roles["pad"] or roles["eos"]
    for role, token in roles.items():
        if token is not None and tok.token_to_id(token) is None:
            field = f"{role}_token" if config.get(f"{role}_token") is not None else "eos_token"
            raise ValueError(f"{config_path}: field '{field}' names {token!r}, which is not in the vocabulary")
    return roles


def _added_tokens(config: Mapping[str, Any], config_path: Path, num_ranks: int,
                  model_path: Path) -> dict[str, tuple[int, AddedToken]]:
    """content -> (id, token with its flags) of a GLM-4 config's `added_tokens_decoder`; ids must come after the
    ranks and each token appear once."""
    table = config.get("added_tokens_decoder") or {}
    if not isinstance(table, dict):
        raise ValueError(f"{config_path}: field 'added_tokens_decoder' must be an object of id -> token")
    out: dict[str, tuple[int, AddedToken]] = {}
    for key, entry in table.items():
        field = f"added_tokens_decoder[{key!r}]"
        content = entry.get("content") if isinstance(entry, dict) else None
        if not isinstance(content, str) or not str(key).isdigit():
            raise ValueError(f"{config_path}: field {field} must map a numeric id to {{'content': token, ...}}")
        idx = int(key)
        if idx < num_ranks:
            raise ValueError(f"{config_path}: field {field} ({content!r}) collides with rank {idx} of {model_path} "
                             f"(added tokens take ids from {num_ranks})")
        if content in out:
            raise ValueError(f"{config_path}: field {field}: {content!r} already has id {out[content][0]}")
        flags = {k: bool(entry.get(k, False)) for k in ("lstrip", "rstrip", "single_word", "normalized")}
        out[content] = (idx, AddedToken(content, special=bool(entry.get("special", True)), **flags))
    return out


def _without_added(config: Mapping[str, Any]) -> dict[str, Any]:
    """A released config without its added-token table (`save_released` rebuilds it from the vocabulary)."""
    return {k: v for k, v in config.items() if k != "added_tokens_decoder"}
