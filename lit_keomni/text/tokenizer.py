"""Bilingual (Mandarin + English) text tokenizer, and its extension with discrete speech tokens.

A thin layer over Hugging Face `tokenizers`:

- `TextTokenizer.train(texts)` builds a small BPE for ASR targets. Text is NFKC-normalised (full-width → half-width,
  case kept); every Han character is its own pre-token (Chinese has no spaces, so merges across characters would only
  learn corpus-specific words); punctuation is isolated; spaces become the SentencePiece marker "▁" glued to the next
  word, so English words carry a word-boundary marker and decoding restores the original spacing exactly.
  Every character seen in training is in the vocabulary; unseen ones map to `<|unk|>`.
- `TextTokenizer.from_file(path)` wraps any local `tokenizer.json` (Whisper's, Llama-3's, ...), adding our specials
  when missing.
- `add_speech_tokens(K)` appends `<|audio_0|>` ... `<|audio_{K-1}|>` and the dialogue role tokens after every
  existing id, so a text LM's embedding rows keep their meaning when its vocabulary grows (GLM-4-Voice / KE-Omni style).

Special token ids are never produced by `encode` unless their literal strings appear in the text.
"""

from __future__ import annotations

import json
import string
from pathlib import Path
from typing import Iterable, Sequence

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

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


def audio_token(index: int) -> str:
    """Name of the speech token for codebook entry `index`, e.g. `<|audio_7|>`."""
    return f"<|audio_{index}|>"


def _special(content: str) -> AddedToken:
    # normalized=False: NFKC must not rewrite "<|...|>" before the added-token matcher sees it.
    return AddedToken(content, special=True, normalized=False)


class TextTokenizer:
    """A `tokenizers.Tokenizer` with guaranteed `<|pad|>`, `<|bos|>`, `<|eos|>` and an optional speech vocabulary.

    Wrapping mutates `tokenizer`: the three specials are added if missing (appended, so no existing id moves).
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tok = tokenizer
        missing = [t for t in (PAD, BOS, EOS) if tokenizer.token_to_id(t) is None]
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
        """Load a local `tokenizer.json`; a `tokenizer_config.json` beside it is checked for `num_audio_tokens`."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as err:  # tokenizers raises a bare Exception for malformed JSON
            raise ValueError(f"{path} is not a valid tokenizer.json: {err}") from err
        self = cls(tok)
        config_path = path.parent / CONFIG_NAME
        if config_path.is_file():
            try:
                config = json.loads(config_path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as err:
                raise ValueError(f"{config_path} is not valid JSON: {err}") from err
            # Foreign configs (Whisper, Llama-3) lack the field; only ours records the speech vocabulary.
            expected = config.get("num_audio_tokens") if isinstance(config, dict) else None
            if expected is not None and expected != self._num_audio:
                raise ValueError(
                    f"{config_path}: num_audio_tokens={expected} but {path} holds {self._num_audio} audio tokens"
                )
        return self

    def save(self, folder: str | Path) -> Path:
        """Write `folder/tokenizer.json` and `folder/tokenizer_config.json`; return the tokenizer.json path.

        The config names our specials in Hugging Face's keys, so `transformers.PreTrainedTokenizerFast` can read the
        folder too, and records `num_audio_tokens` for the check in `from_file`.
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / TOKENIZER_NAME
        self._tok.save(str(path))
        config: dict[str, object] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "pad_token": PAD,
            "bos_token": BOS,
            "eos_token": EOS,
            "num_audio_tokens": self._num_audio,
        }
        if self._tok.token_to_id(UNK) is not None:
            config["unk_token"] = UNK
        (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        return path

    # ---------------------------------------------------------------- text

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, with no BOS/EOS (callers frame sequences themselves)."""
        # add_special_tokens=False also disables foreign post-processors (Llama-3 prepends <|begin_of_text|>).
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`encode` for many texts, run in parallel by `tokenizers`."""
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

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
    def pad_id(self) -> int:
        return self.token_to_id(PAD)

    @property
    def bos_id(self) -> int:
        return self.token_to_id(BOS)

    @property
    def eos_id(self) -> int:
        return self.token_to_id(EOS)

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
        """Append the role tokens and `codebook_size` audio tokens after every existing id.

        Idempotent for the same size. A tokenizer that already holds a different number of audio tokens raises
        ValueError: the speech LM's embedding rows are tied to one codebook.
        """
        if codebook_size < 1:
            raise ValueError(f"codebook_size must be >= 1, got {codebook_size}")
        if self._num_audio not in (0, codebook_size):
            raise ValueError(
                f"tokenizer already has {self._num_audio} audio tokens; "
                f"cannot extend it to codebook_size={codebook_size}"
            )
        self._tok.add_special_tokens([_special(t) for t in ROLE_TOKENS])
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
                raise ValueError(f"{audio_token(k)} has id {idx}, expected {first + k}: audio ids must be consecutive")
            k += 1
        return k

