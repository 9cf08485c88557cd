"""KE-Omni's speech-in, text-out model (seed 000 §4.1-4.2): speech encoder -> adapter -> LLM.

- Front end: Whisper log-mel (``nn.audio.LogMel``) of 16 kHz audio, computed inside the model.
- Speech encoder: a Whisper-style ``SpeechEncoder`` giving 50 Hz states (``SpeechEncoder.frames_50hz``): a whole
  Whisper encoder (``pool == 1``), or the layers of a stage-1 export below its pooling. Frozen by default: its
  parameters take no gradient and it stays in eval mode when the rest trains.
- Speech adapter: frames stacked x5 -> MLP (``nn.adapter.SpeechAdapter``), 50 Hz -> 10 Hz, into the LLM's width.
- LLM: ``nn.transformer.Transformer``. Its input is the prompt's token embeddings in which every ``<|pad|>`` slot of
  ``text.templates.keomni_dialogue`` (one per adapter frame of the user's turn) is replaced, in order, by an adapter
  frame: text embeddings and speech features concatenated as the paper says. The answer is text.

``respond`` answers spoken questions greedily with the KV cache, optionally after earlier exchanges (multi-turn).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lit_keomni.configs import SpeechTokenizerConfig, TransformerConfig, config_dict
from lit_keomni.nn.adapter import SpeechAdapter, speech_frames
from lit_keomni.nn.audio import LogMel
from lit_keomni.nn.transformer import Transformer
from lit_keomni.nn.whisper import SpeechEncoder, lengths_to_mask
from lit_keomni.text.templates import KEOMNI_SYSTEM_PROMPT, Exchange, keomni_dialogue
from lit_keomni.text.tokenizer import ROLE_TOKENS, SPEECH_SLOT, TextTokenizer


def llm_tokenizer(path: str | Path) -> TextTokenizer:
    """An LLM's own vocabulary (a ``tokenizer.json`` or a released model's folder, e.g. Llama-3.1's) with the
    dialogue role tokens and the speech slot appended after its ids where missing, for a KE-Omni LLM loaded from a
    released folder (no speech tokens: KE-Omni's speech is continuous)."""
    from tokenizers import AddedToken

    from lit_keomni.checkpoints import read_vocabulary

    tokenizer = read_vocabulary(path)
    missing = [t for t in (*ROLE_TOKENS, SPEECH_SLOT) if tokenizer.backend.token_to_id(t) is None]
    tokenizer.backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
    return tokenizer


class KeOmni(nn.Module):
    """Speech encoder + adapter + LLM; ``forward`` gives the LLM's logits over a prompt with speech slots."""

    def __init__(self, encoder: SpeechEncoder, adapter: SpeechAdapter, llm: Transformer, *,
                 freeze_encoder: bool = True) -> None:
        super().__init__()
        if adapter.d_in != encoder.config.d_model or adapter.d_out != llm.config.n_embd:
            raise ValueError(f"KeOmni: adapter maps {adapter.d_in} -> {adapter.d_out}, but the encoder's d_model is "
                             f"{encoder.config.d_model} and the LLM's n_embd {llm.config.n_embd}")
        self.logmel = LogMel(n_mels=encoder.config.n_mels)
        self.encoder = encoder
        self.adapter = adapter
        self.llm = llm
        self.freeze_encoder = freeze_encoder
        if freeze_encoder:
            self.encoder.requires_grad_(False)
            self.encoder.eval()

    # ------------------------------------------------------------------------------------------------ config

    @classmethod
    def from_config(cls, config: Mapping[str, Any], *, source: str = "config") -> KeOmni:
        """Build (random weights) from ``{"llm": TransformerConfig, "encoder": SpeechTokenizerConfig, "adapter":
        SpeechAdapter arguments}`` dicts, as ``config_dict`` writes them."""
        for part in ("llm", "encoder", "adapter"):
            if not isinstance(config.get(part), Mapping):
                raise ValueError(f"{source}: field 'config.{part}' missing (a KE-Omni export holds llm, encoder, adapter)")
        llm = Transformer(TransformerConfig.from_dict(dict(config["llm"]), source=f"{source} config.llm"))
        encoder = SpeechEncoder(SpeechTokenizerConfig.from_dict(dict(config["encoder"]), source=f"{source} config.encoder"))
        a = dict(config["adapter"])
        unknown = sorted(set(a) - {"d_in", "d_out", "stack", "hidden"})
        if unknown or "d_in" not in a or "d_out" not in a:
            raise ValueError(f"{source}: field 'config.adapter' must hold d_in, d_out, stack, hidden (got {sorted(a)})")
        if a["d_in"] != encoder.config.d_model or a["d_out"] != llm.config.n_embd:
            raise ValueError(f"{source}: field 'config.adapter' maps {a['d_in']} -> {a['d_out']}, but config.encoder."
                             f"d_model is {encoder.config.d_model} and config.llm.n_embd {llm.config.n_embd}")
        return cls(encoder, SpeechAdapter(**a), llm)

    def config_dict(self) -> dict[str, Any]:
        return {"llm": config_dict(self.llm.config), "encoder": config_dict(self.encoder.config),
                "adapter": self.adapter.config()}

    def train(self, mode: bool = True) -> KeOmni:
        super().train(mode)
        if self.freeze_encoder:
            self.encoder.eval()
        return self

    # ------------------------------------------------------------------------------------------------ speech

    @property
    def stack(self) -> int:
        return self.adapter.stack

    def speech_frames(self, num_samples: int) -> int:
        """LLM positions (adapter frames) that ``num_samples`` 16 kHz samples of speech take."""
        return speech_frames(num_samples, self.adapter.stack, self.logmel.hop_length)

    def features(self, wavs: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """Mono 16 kHz waveforms -> padded log-mel (N, n_mels, T) and mel lengths (N,), on the model's device."""
        device = self.llm.embed.weight.device
        lengths = torch.tensor([int(w.shape[-1]) for w in wavs], device=device)
        audio = torch.zeros(len(wavs), int(lengths.max()), device=device)
        for i, w in enumerate(wavs):
            audio[i, : w.shape[-1]] = w.to(device=device, dtype=audio.dtype)
        return self.logmel(audio, lengths)

    def encode(self, mels: Tensor, mel_lengths: Tensor) -> tuple[Tensor, Tensor]:
        """Log-mels -> adapter frames (N, T // stack, n_embd) at 10 Hz and their lengths."""
        train_encoder = torch.is_grad_enabled() and any(p.requires_grad for p in self.encoder.parameters())
        with torch.set_grad_enabled(train_encoder):
            states, lengths = self.encoder.frames_50hz(mels, mel_lengths)
        return self.adapter(states, lengths)

    # ------------------------------------------------------------------------------------------------ forward

    def forward(self, ids: Tensor, speech_mask: Tensor | None = None, mels: Tensor | None = None,
                mel_lengths: Tensor | None = None, *, input_pos: Tensor | None = None,
                attention_mask: Tensor | None = None, return_hidden: bool = False, targets: Tensor | None = None,
                loss_chunk: int = 0) -> Any:
        """Logits (B, T, padded_vocab) of the LLM over ``ids`` (B, T) whose ``speech_mask`` (B, T) slots are replaced,
        in row-major order, by the adapter frames of ``mels`` (one entry per user turn, in the order their slots
        appear: row 0's turns first). Without ``speech_mask`` a plain LLM call (e.g. a decoding step).
        ``input_pos``/``attention_mask`` go to the LLM (KV-cache decoding, left padding); ``return_hidden``: the
        LLM's last hidden states after the final norm (B, T, n_embd) instead of logits (the speech decoder's input);
        ``targets``/``loss_chunk``: the per-token losses and predictions instead (``Transformer.forward``)."""
        x = self.llm.embed(ids)
        if speech_mask is not None and bool(speech_mask.any()):
            if mels is None or mel_lengths is None:
                raise ValueError("KeOmni.forward: speech_mask has slots but no mels/mel_lengths were given")
            frames, lengths = self.encode(mels, mel_lengths)
            valid = lengths_to_mask(lengths, frames.shape[1])
            n_slots, n_frames = int(speech_mask.sum()), int(lengths.sum())
            if n_slots != n_frames:
                raise ValueError(f"KeOmni.forward: {n_slots} speech slots in the prompt but the audio gives {n_frames} "
                                 f"adapter frames (per turn {lengths.tolist()}); slots must be counted with "
                                 f"speech_frames(samples, stack={self.stack})")
            x = x.masked_scatter(speech_mask[..., None], frames[valid].to(x.dtype))
        return self.llm(inputs_embeds=x, input_pos=input_pos, attention_mask=attention_mask,
                        return_hidden=return_hidden, targets=targets, loss_chunk=loss_chunk)

    # ------------------------------------------------------------------------------------------------ inference

    @torch.no_grad()
    def respond(self, tokenizer: TextTokenizer, wavs: Sequence[Tensor], *, max_new_tokens: int = 128,
                history: Sequence[Sequence[tuple[Tensor, str]]] | None = None,
                system_prompt: str = KEOMNI_SYSTEM_PROMPT) -> list[str]:
        """Greedy text answers to spoken questions ``wavs`` (mono float, 16 kHz), one batch with the KV cache.

        ``history``: for each question, the earlier exchanges of its dialogue as (user speech, assistant answer text).
        ``system_prompt``: ``text.templates.KEOMNI_TRANSCRIBE_PROMPT`` asks an aligned adapter's model for the words.
        """
        from lit_keomni.generate import generate

        if history is not None and len(history) != len(wavs):
            raise ValueError(f"KeOmni.respond: {len(history)} histories for {len(wavs)} questions")
        prompts, turns = [], []
        for i, wav in enumerate(wavs):
            past = list(history[i]) if history is not None else []
            exchanges = [Exchange(user_frames=self.speech_frames(w.shape[-1]), text=t) for w, t in past]
            exchanges.append(Exchange(user_frames=self.speech_frames(wav.shape[-1])))
            for k, ex in enumerate(exchanges):
                if ex.user_frames < 1:
                    raise ValueError(f"KeOmni.respond: question {i}, turn {k}: audio shorter than one adapter frame "
                                     f"({self.stack} encoder frames = {self.stack * 20} ms)")
            prompts.append(keomni_dialogue(tokenizer, exchanges, system_prompt)[0])
            turns += [w for w, _ in past] + [wav]
        room = self.llm.config.block_size - max(len(p) for p in prompts)
        if room < 1:
            raise ValueError(f"KeOmni.respond: a prompt of {max(len(p) for p in prompts)} tokens leaves no room in "
                             f"the LLM's block_size {self.llm.config.block_size}")
        mels, mel_lengths = self.features(turns)
        runner = _SpeechPrompt(self, tokenizer.token_to_id(SPEECH_SLOT), mels, mel_lengths)
        # Left padding uses <|eos|>, so the only <|pad|> ids of the prefill are the speech slots.
        out = generate(runner, prompts, max_new_tokens=min(max_new_tokens, room), temperature=0.0,
                       stop_ids=[tokenizer.eos_id], pad_id=tokenizer.eos_id)
        return [tokenizer.decode(ids) for ids in out]


class _SpeechPrompt:
    """``KeOmni`` as ``generate`` drives an LLM: the first call (the prefill of the prompts) puts the speech features
    into the ``<|pad|>`` slots; later calls are plain decoding steps."""

    def __init__(self, model: KeOmni, slot_id: int, mels: Tensor, mel_lengths: Tensor) -> None:
        self.model, self.slot_id, self.mels, self.mel_lengths = model, slot_id, mels, mel_lengths
        self.config = model.llm.config
        self.embed = model.llm.embed
        self.prefilled = False

    def set_kv_cache(self, *args: Any, **kwargs: Any) -> None:
        self.model.llm.set_kv_cache(*args, **kwargs)

    def clear_kv_cache(self) -> None:
        self.model.llm.clear_kv_cache()

    def __call__(self, idx: Tensor, input_pos: Tensor | None = None, attention_mask: Tensor | None = None) -> Tensor:
        if self.prefilled:
            return self.model(idx, input_pos=input_pos, attention_mask=attention_mask)
        self.prefilled = True
        return self.model(idx, idx == self.slot_id, self.mels, self.mel_lengths, input_pos=input_pos,
                          attention_mask=attention_mask)


@torch.no_grad()
def answer_hidden_states(model: KeOmni, tokenizer: TextTokenizer, wavs: Sequence[Tensor], history: Sequence[str],
                         answer: Sequence[int]) -> Tensor:
    """The speech decoder's input for one answer: the LLM's last hidden states (len(answer), n_embd) at the input
    positions of the answer's text tokens, teacher-forced over the KE-Omni dialogue. ``wavs``: the dialogue's user
    turns (mono 16 kHz), the last one being answered; ``history``: the earlier answers' texts (len(wavs) - 1);
    ``answer``: the answer's token ids without ``<|eos|>``. The LLM is causal, so these equal the states a KV-cache
    generation of ``answer`` computes, and those of the stage-5/6 training features."""
    if len(history) != len(wavs) - 1:
        raise ValueError(f"answer_hidden_states: {len(history)} earlier answers for {len(wavs)} user turns")
    exchanges = [Exchange(user_frames=model.speech_frames(w.shape[-1]), text=t) for w, t in zip(wavs, history)]
    exchanges.append(Exchange(user_frames=model.speech_frames(wavs[-1].shape[-1])))
    prompt = keomni_dialogue(tokenizer, exchanges)[0]
    device = model.llm.embed.weight.device
    ids = torch.tensor([prompt + [int(i) for i in answer]], device=device)
    mels, mel_lengths = model.features(wavs)
    hidden = model(ids, ids == tokenizer.token_to_id(SPEECH_SLOT), mels, mel_lengths, return_hidden=True)
    return hidden[0, len(prompt):]
