"""Sequence builders with loss masks: every training sequence of the LM stages is made here.

A sequence is a list of segments, each ``(ids, trained)``; ``build`` concatenates them and returns the ids and a
boolean mask of the positions whose *prediction* is trained (the loss at position t is on predicting ids[t]).
Templates (GLM-4-Voice §2.2, §2.3 and Appendix F "Prompt template for spoken dialogue"; KE-Omni §4):
- TTS / text-to-token: ``text <|begin_of_audio|> speech <|end_of_audio|>``, loss on speech and the end marker.
- ASR: ``<|begin_of_audio|> speech <|end_of_audio|> text <|eos|>``, loss on the text and ``<|eos|>``.
- text document: ``text <|eos|>``, speech document: ``<|begin_of_audio|> speech <|end_of_audio|>``; all trained.
- GLM-4-Voice dialogue, ``direct`` and ``text_guided`` (Appendix F, system prompt and line breaks included), one block
  per exchange; loss on the assistant side only.
- KE-Omni dialogue: the user's speech is a run of ``<|pad|>`` slots that the speech adapter's frames replace; the
  answer is text ending in ``<|eos|>``.

Dialogue templates are rendered as one string (speech as ``<|audio_k|>``) and tokenized in one call, so the ids are
exactly those of the written template; a token is trained when its first character lies in a trained piece.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lit_keomni.text.tokenizer import SPEECH_SLOT, TextTokenizer, audio_token

BEGIN_AUDIO = "<|begin_of_audio|>"
END_AUDIO = "<|end_of_audio|>"
SYSTEM = "<|system|>"
USER = "<|user|>"
ASSISTANT = "<|assistant|>"
GLM_SYSTEM_PROMPT = ("User will provide you with a speech instruction. Think about the instruction and speak the "
                     "response aloud directly.")
"""System prompt of GLM-4-Voice's spoken-dialogue templates (seed 003, Appendix F)."""
KEOMNI_SYSTEM_PROMPT = "You are a helpful voice assistant. Answer the user's spoken question briefly."
"""System prompt of the KE-Omni mode (the seed does not print one)."""
KEOMNI_TRANSCRIBE_PROMPT = "You are a speech recogniser. Write down exactly what the user says."
"""System prompt of the KE-Omni alignment task (``SFTDataModule(target="transcript")``): the answer is the user's own
words, so the adapter learns to carry them into the LLM before the LLM learns to answer."""
GLM_STREAMING_PROMPT = ("User will provide you with a speech instruction. Do it step by step. First, think about the "
                        "instruction and respond in a interleaved manner, with 13 text token followed by 26 audio "
                        "tokens. ")
"""System prompt the released glm-4-voice-9b answers speech with (THUDM/GLM-4-Voice ``web_demo.py``), verbatim."""
STREAMING_OPENING = "streaming_transcription\n"
"""What follows ``<|assistant|>`` in the released model's prompt, before its interleaved answer."""
STREAMING_TEXT, STREAMING_AUDIO = 13, 26
"""The released model's answer alternates 13 text tokens and 26 speech tokens (~2 s of speech at 12.5 Hz)."""
PREFIX_TOKENS = ("[gMASK]", "<sop>")
"""GLM-4's sequence prefix: its tokenizer puts these before every prompt, and the model expects them."""
SFT_TARGETS = ("answer", "transcript")
DIALOGUE_MODES = ("direct", "text_guided", "streaming")
SFT_MODES = ("discrete", "continuous")


def check_sft_options(owner: str, mode: str, template: str, tokenizer: str | None, target: str = "answer") -> None:
    """The SFT options the model and its DataModule share: ``mode`` (discrete: GLM-4-Voice speech tokens; continuous:
    KE-Omni encoder + adapter), ``template`` (discrete answers) and ``target`` (continuous mode only); errors name
    ``owner``. ``tokenizer`` (the LLM's own vocabulary) serves both modes."""
    if mode not in SFT_MODES:
        raise ValueError(f"{owner}: mode must be one of {SFT_MODES}, got {mode!r}")
    if target not in SFT_TARGETS:
        raise ValueError(f"{owner}: target must be one of {SFT_TARGETS}, got {target!r}")
    if target != "answer" and mode == "discrete":
        raise ValueError(f"{owner}: target={target!r} is for the continuous mode (adapter alignment)")
    if template not in DIALOGUE_MODES:
        raise ValueError(f"{owner}: template must be one of {DIALOGUE_MODES}, got {template!r}")


@dataclass
class Exchange:
    """One user turn and the assistant's answer. ``user_codes``: the user's speech tokens (GLM mode);
    ``user_frames``: speech-adapter frames of the user's audio (KE-Omni mode); ``text``/``codes``: the answer as text
    and as speech tokens (``None`` for the exchange being generated)."""

    user_codes: Sequence[int] | None = None
    user_frames: int = 0
    text: str | None = None
    codes: Sequence[int] | None = None


def build(segments: Sequence[tuple[Sequence[int], bool]]) -> tuple[list[int], list[bool]]:
    """Concatenate ``(ids, trained)`` segments into ids and a per-position loss mask."""
    ids: list[int] = []
    mask: list[bool] = []
    for seg, trained in segments:
        ids.extend(int(i) for i in seg)
        mask.extend([trained] * len(seg))
    return ids, mask


def tts(tokenizer: TextTokenizer, text: str, codes: Sequence[int] | None) -> tuple[list[int], list[bool]]:
    """Text-to-token sequence; with ``codes=None`` only the prompt (text + begin-of-audio) for generation."""
    prompt = [*tokenizer.encode(text), tokenizer.token_to_id(BEGIN_AUDIO)]
    if codes is None:
        return build([(prompt, False)])
    return build([(prompt, False), ([*tokenizer.speech_to_ids(codes), tokenizer.token_to_id(END_AUDIO)], True)])


def pad_batch(rows: Sequence[tuple[list[int], list[bool]]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Right-pad sequences: (inputs (B, T-1), targets (B, T-1)) with untrained targets set to -100."""
    T = max(len(ids) for ids, _ in rows)
    idx = torch.full((len(rows), T), pad_id, dtype=torch.long)
    tgt = torch.full((len(rows), T), -100, dtype=torch.long)
    for i, (ids, mask) in enumerate(rows):
        idx[i, : len(ids)] = torch.tensor(ids)
        tgt[i, : len(ids)] = torch.tensor([t if m else -100 for t, m in zip(ids, mask)])
    return idx[:, :-1], tgt[:, 1:]


def speech_string(codes: Sequence[int]) -> str:
    """``<|begin_of_audio|><|audio_c0|>...<|end_of_audio|>`` for codebook indices ``codes``."""
    return BEGIN_AUDIO + "".join(audio_token(int(c)) for c in codes) + END_AUDIO


def render(tokenizer: TextTokenizer, pieces: Sequence[tuple[str, bool]]) -> tuple[list[int], list[bool]]:
    """Tokenize the concatenated ``(text, trained)`` pieces in one call; a token is trained when its first character
    lies in a trained piece."""
    text = "".join(p for p, _ in pieces)
    owner = []
    for piece, trained in pieces:
        owner.extend([trained] * len(piece))
    enc = tokenizer.backend.encode(text, add_special_tokens=False)
    mask = [bool(owner[start]) if start < len(owner) else False for start, _ in enc.offsets]
    return list(enc.ids), mask


def text_document(tokenizer: TextTokenizer, text: str) -> tuple[list[int], list[bool]]:
    """Unsupervised text: ``text <|eos|>``, every token trained."""
    return build([([*tokenizer.encode(text), tokenizer.eos_id], True)])


def speech_document(tokenizer: TextTokenizer, codes: Sequence[int]) -> tuple[list[int], list[bool]]:
    """Unsupervised speech: ``<|begin_of_audio|> speech <|end_of_audio|>``, every token trained."""
    return build([([tokenizer.token_to_id(BEGIN_AUDIO), *tokenizer.speech_to_ids(codes),
                    tokenizer.token_to_id(END_AUDIO)], True)])


def asr(tokenizer: TextTokenizer, codes: Sequence[int], text: str | None) -> tuple[list[int], list[bool]]:
    """ASR pair: speech then its transcript; loss on the transcript and ``<|eos|>`` only. ``text=None``: the prompt."""
    speech = [tokenizer.token_to_id(BEGIN_AUDIO), *tokenizer.speech_to_ids(codes), tokenizer.token_to_id(END_AUDIO)]
    if text is None:
        return build([(speech, False)])
    return build([(speech, False), ([*tokenizer.encode(text), tokenizer.eos_id], True)])


def glm_dialogue(tokenizer: TextTokenizer, exchanges: Sequence[Exchange], mode: str = "text_guided",
                 system_prompt: str = GLM_SYSTEM_PROMPT) -> tuple[list[int], list[bool]]:
    """GLM-4-Voice spoken dialogue (Appendix F), multi-turn: history exchanges first, loss on every assistant part.

    ``direct``:      ``<|assistant|>\n`` | ``<|begin_of_audio|>{speech}<|end_of_audio|>``
    ``text_guided``: ``<|assistant|>transcript\n`` | ``{text}\n<|assistant|>\n<|begin_of_audio|>{speech}<|end_of_audio|>``
    (``|`` separates prompt from trained part). An exchange whose ``codes`` are None ends the sequence with its
    prompt, ready for generation.
    """
    if mode not in DIALOGUE_MODES:
        raise ValueError(f"glm_dialogue: mode must be one of {DIALOGUE_MODES}, got {mode!r}")
    if mode == "streaming":
        return glm_streaming_dialogue(tokenizer, exchanges)
    pieces: list[tuple[str, bool]] = [(f"{SYSTEM}\n{system_prompt}\n", False)]
    for k, ex in enumerate(exchanges):
        if ex.user_codes is None:
            raise ValueError(f"glm_dialogue: exchange {k} has no user speech tokens")
        pieces.append((f"{'' if k == 0 else chr(10)}{USER}\n{speech_string(ex.user_codes)}\n", False))
        opening = f"{ASSISTANT}\n" if mode == "direct" else f"{ASSISTANT}transcript\n"
        pieces.append((opening, False))
        if ex.codes is None:
            if k != len(exchanges) - 1:
                raise ValueError(f"glm_dialogue: only the last exchange may lack its answer (exchange {k})")
            break
        if mode == "direct":
            pieces.append((speech_string(ex.codes), True))
        else:
            if ex.text is None:
                raise ValueError(f"glm_dialogue: text_guided exchange {k} has no answer text")
            pieces.append((f"{ex.text}\n{ASSISTANT}\n{speech_string(ex.codes)}", True))
    return render(tokenizer, pieces)


def interleave_answer(text_ids: Sequence[int], speech_ids: Sequence[int], text_chunk: int = STREAMING_TEXT,
                      speech_chunk: int = STREAMING_AUDIO) -> list[int]:
    """The released glm-4-voice-9b's answer order: ``text_chunk`` text ids, ``speech_chunk`` speech ids, again, until
    both run out (the rest of the longer one follows in its chunks)."""
    out: list[int] = []
    for t in range(0, max(-(-len(text_ids) // text_chunk), -(-len(speech_ids) // speech_chunk))):
        out += [*text_ids[t * text_chunk:(t + 1) * text_chunk], *speech_ids[t * speech_chunk:(t + 1) * speech_chunk]]
    return out


def split_answer(tokenizer: TextTokenizer, ids: Sequence[int]) -> tuple[list[int], list[int]]:
    """An interleaved answer's ids -> (its text ids, its speech-token codebook indices), each in order; other special
    tokens are dropped."""
    off, n = tokenizer.audio_token_offset, tokenizer.num_audio_tokens
    speech = [int(i) - off for i in ids if off <= int(i) < off + n]
    return [int(i) for i in ids if not off <= int(i) < off + n], speech


def glm_streaming_dialogue(tokenizer: TextTokenizer, exchanges: Sequence[Exchange],
                           system_prompt: str = GLM_STREAMING_PROMPT) -> tuple[list[int], list[bool]]:
    """The released glm-4-voice-9b's dialogue (THUDM/GLM-4-Voice ``web_demo.py`` + ``model_server.py``), multi-turn:

    ``[gMASK]<sop><|system|>\n{prompt}<|user|>\n{speech}<|assistant|>streaming_transcription\n`` |
    ``{13 text, 26 speech, 13 text, ...}<|user|>`` — the answer's text and speech interleaved (``interleave_answer``,
    speech tokens without begin/end-of-audio), ended by ``<|user|>``, which also opens the next user turn
    (``\n{speech}<|assistant|>streaming_transcription\n``). ``[gMASK]<sop>`` lead when the vocabulary has them
    (GLM-4's tokenizer adds them to every prompt). An exchange whose ``codes`` are None ends the sequence with its
    prompt, ready for generation.
    """
    prefix = "".join(t for t in PREFIX_TOKENS if tokenizer.backend.token_to_id(t) is not None)
    ids: list[int] = []
    mask: list[bool] = []
    for k, ex in enumerate(exchanges):
        if ex.user_codes is None:
            raise ValueError(f"glm_streaming_dialogue: exchange {k} has no user speech tokens")
        head = f"{prefix}{SYSTEM}\n{system_prompt}{USER}" if k == 0 else ""
        prompt, _ = render(tokenizer, [(f"{head}\n{speech_string(ex.user_codes)}{ASSISTANT}{STREAMING_OPENING}", False)])
        ids += prompt
        mask += [False] * len(prompt)
        if ex.codes is None:
            if k != len(exchanges) - 1:
                raise ValueError(f"glm_streaming_dialogue: only the last exchange may lack its answer (exchange {k})")
            break
        if ex.text is None:
            raise ValueError(f"glm_streaming_dialogue: exchange {k} has no answer text")
        answer = [*interleave_answer(tokenizer.encode(ex.text), tokenizer.speech_to_ids(ex.codes)),
                  tokenizer.token_to_id(USER)]
        ids += answer
        mask += [True] * len(answer)
    return ids, mask


def keomni_dialogue(tokenizer: TextTokenizer, exchanges: Sequence[Exchange],
                    system_prompt: str = KEOMNI_SYSTEM_PROMPT) -> tuple[list[int], list[bool]]:
    """KE-Omni prompt: ``<|system|>\n{prompt}\n<|user|>\n{speech slots}\n<|assistant|>\n`` | ``{text}<|eos|>`` per
    exchange; each user turn is ``user_frames`` ``<|pad|>`` slots, replaced by speech-adapter frames in the model.
    An exchange whose ``text`` is None ends the sequence with its prompt."""
    pieces: list[tuple[str, bool]] = [(f"{SYSTEM}\n{system_prompt}\n", False)]
    for k, ex in enumerate(exchanges):
        if ex.user_frames < 1:
            raise ValueError(f"keomni_dialogue: exchange {k} has no speech frames (user_frames={ex.user_frames})")
        pieces.append((f"{'' if k == 0 else chr(10)}{USER}\n{SPEECH_SLOT * ex.user_frames}\n{ASSISTANT}\n", False))
        if ex.text is None:
            if k != len(exchanges) - 1:
                raise ValueError(f"keomni_dialogue: only the last exchange may lack its answer (exchange {k})")
            break
        pieces.append((f"{ex.text}{tokenizer.eos_token}", True))
    return render(tokenizer, pieces)
