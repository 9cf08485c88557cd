"""Tiny random-weight exports of every piece both ``chat`` pipelines load, consistent with each other: for the chat
and released-model tests and the chat latency benchmark (``benchmarks/chat_latency.py`` puts the repository root on
``sys.path`` to import this)."""

from __future__ import annotations

from pathlib import Path

import torch

from lit_keomni.audio import SAMPLE_RATE
from lit_keomni.checkpoints import decoder_handoff, lm_tokenizer, unit_meta, write_export
from lit_keomni.configs import SpeechTokenizerConfig, TransformerConfig, config_dict
from lit_keomni.nn.adapter import SpeechAdapter
from lit_keomni.nn.hifigan import UnitVocoder, VocoderConfig
from lit_keomni.nn.keomni import KeOmni
from lit_keomni.nn.speech_decoder import DurationPredictor, UnitGenerator
from lit_keomni.nn.transformer import Transformer
from lit_keomni.nn.whisper import SpeechEncoder, SpeechTokenizerModel
from lit_keomni.text.templates import ASSISTANT, BEGIN_AUDIO, END_AUDIO, USER
from lit_keomni.text.tokenizer import TextTokenizer

TINY_TEXTS = ("Does Sam have a pet? Sam lives with a duck.", "What is two plus three? Two plus three is five.",
              "山姆有宠物吗？山姆和一只鸭子住在一起。", "The cat sat on the mat and looked at the red ball.")
"""What the tiny exports' BPE tokenizer is trained on."""


def tiny_exports(out: str | Path, *, codebook: int = 16, speaker: str = "agentFemale", frames_per_token: float = 2.0,
                 seed: int = 0) -> dict[str, Path]:
    """Random-weight exports of every piece both pipelines load, consistent with each other and as small as CPU tests
    want: ``stage1`` (speech tokenizer, ``codebook`` codes, with a BPE tokenizer trained on ``TINY_TEXTS``),
    ``keomni`` (keomni_lm), ``glm`` (speech_lm, text_guided SFT), ``duration``, ``unit_generator``, ``vocoder``
    (for ``speaker``). Answers run to their length limits: the LMs' output rows of their stop tokens (``<|eos|>``,
    ``<|begin_of_audio|>``, ``<|assistant|>``, ``<|end_of_audio|>``, ``<|user|>``) are zeroed, a logit of 0 against
    random ones. The duration predictor says ``frames_per_token`` for every token (its input projection is zeroed
    and its head scaled), so an answer's length in units is known. Used by the tests and the latency benchmark."""
    out = Path(out)
    torch.manual_seed(seed)
    text_tok = TextTokenizer.train(list(TINY_TEXTS) * 4, vocab_size=300, min_frequency=1)
    s1 = SpeechTokenizerConfig(d_model=64, n_head=4, ffn_dim=128, encoder_layers=2, vq_position=1, decoder_layers=1,
                               codebook_size=codebook, commitment=0.25, vocab_size=text_tok.vocab_size)
    paths = {"stage1": write_export(out / "stage1", kind="speech_tokenizer", config=config_dict(s1),
                                    state_dict=SpeechTokenizerModel(s1).state_dict(),
                                    extra={"frame_rate_hz": s1.frame_rate_hz, "codebook_size": codebook,
                                           "sample_rate": SAMPLE_RATE, "vq_active": True},
                                    files={"tokenizer": text_tok.save})}
    tok, _ = lm_tokenizer(paths["stage1"])
    lm = TransformerConfig.from_name("tiny", n_layer=2, n_embd=64, n_head=4, n_kv_head=2, intermediate_size=172,
                                     block_size=512, vocab_size=tok.vocab_size)
    stops = [tok.eos_id, *(tok.token_to_id(t) for t in (BEGIN_AUDIO, ASSISTANT, END_AUDIO, USER))]
    keomni = KeOmni(SpeechEncoder(s1), SpeechAdapter(64, 64, stack=5, hidden=48), Transformer(lm))
    glm = Transformer(lm)
    with torch.no_grad():
        for head in (keomni.llm.lm_head, glm.lm_head):
            head.weight[stops] = 0.0
    paths["keomni"] = write_export(out / "keomni", kind="keomni_lm", config=keomni.config_dict(),
                                   state_dict=keomni.state_dict(), files={"tokenizer": tok.save},
                                   extra={"stage": "sft", "encoder_from": str(paths["stage1"].resolve()),
                                          "speech_tokenizer": {"frame_rate_hz": s1.frame_rate_hz,
                                                               "codebook_size": codebook,
                                                               "export": str(paths["stage1"].resolve())}})
    paths["glm"] = write_export(out / "glm", kind="speech_lm", config=config_dict(lm), state_dict=glm.state_dict(),
                                files={"tokenizer": tok.save},
                                extra={"stage": "sft", "template": "text_guided",
                                       "speech_tokenizer": {"frame_rate_hz": s1.frame_rate_hz,
                                                            "codebook_size": codebook,
                                                            "export": str(paths["stage1"].resolve())}})
    handoff = decoder_handoff(paths["keomni"], paths["stage1"])
    dec = TransformerConfig.from_name("tiny", n_layer=2, n_embd=64, n_head=4, n_kv_head=2, intermediate_size=172,
                                      block_size=512)
    dp = DurationPredictor(64, dec)
    with torch.no_grad():
        dp.proj.weight.zero_()
        raw = float(dp.raw(torch.zeros(1, 1, 64), torch.ones(1, 1, dtype=torch.bool))[0, 0])
        dp.net.lm_head.weight.mul_(frames_per_token / raw)
    paths["duration"] = write_export(out / "duration", kind="duration", config=config_dict(dp.config),
                                     state_dict=dp.state_dict(), extra={**handoff, "speaker": speaker})
    ug = UnitGenerator(64, codebook, dec)
    paths["unit_generator"] = write_export(out / "unit_generator", kind="unit_generator",
                                           config=config_dict(ug.config), state_dict=ug.state_dict(),
                                           extra={**handoff, "speaker": speaker})
    paths["vocoder"] = tiny_vocoder(out / "vocoder", paths["stage1"], speaker=speaker)
    return paths


def tiny_vocoder(out: str | Path, stage1: str | Path, *, speaker: str = "agentFemale") -> Path:
    """A random-weight unit vocoder export for the units of the stage-1 export ``stage1`` (any tokenizer's)."""
    units = unit_meta(stage1)
    vc = VocoderConfig.from_name("tiny", upsample_initial_channel=32, resblock_kernel_sizes=(3,),
                                 resblock_dilation_sizes=((1, 3),))
    vocoder = UnitVocoder(units["num_units"], vc)
    return write_export(out, kind="vocoder", config=config_dict(vc), state_dict=vocoder.state_dict(),
                        extra={"num_units": units["num_units"], "frame_rate": units["frame_rate"],
                               "sample_rate": vc.sample_rate, "hop": vocoder.hop, "speaker": speaker,
                               "units_fingerprint": units["fingerprint"], "units_kind": units["kind"],
                               "units_from": str(Path(stage1).resolve())})


FLOW_TINY = dict(encoder_dim=32, encoder_heads=2, encoder_ffn_dim=64, estimator_channels=(16, 16),
                 estimator_mid_levels=1, estimator_heads=2, estimator_head_dim=8, token_dim=16)
"""A flow decoder smaller than the "tiny" preset, for tests and the chat benchmark."""
HIFT_TINY = dict(base_channels=16, f0_channels=16, resblock_kernel_sizes=(3,), resblock_dilation_sizes=((1, 3),))
"""A HiFT vocoder smaller than the "tiny" preset."""


def tiny_mel_vocoder(out: str | Path) -> Path:
    """A random-weight tiny "mel_vocoder" export (what stage 7 HiFT writes)."""
    from lit_keomni.nn.hift import HiFTConfig, HiFTGenerator, MelFrontEnd

    c = HiFTConfig.from_name("tiny", **HIFT_TINY)
    torch.manual_seed(0)
    return write_export(out, kind="mel_vocoder", config=config_dict(c), state_dict=HiFTGenerator(c).state_dict(),
                        extra={"sample_rate": c.sampling_rate, "n_mels": c.in_channels, "hop": c.hop,
                               "mel": MelFrontEnd.of(c).settings()})


def tiny_decoder(out: str | Path, stage1: str | Path, mel_vocoder: str | Path, *,
                 fingerprint: str | None = None) -> Path:
    """A random-weight tiny "flow_decoder" export for the speech tokens of ``stage1``, with ``mel_vocoder`` inside."""
    import json

    from lit_keomni.nn.flow import FlowConfig, FlowDecoder
    from lit_keomni.token2wav import copy_vocoder, flow_export_meta

    units = unit_meta(stage1)
    c = FlowConfig.from_name("tiny", vocab_size=units["num_units"], **FLOW_TINY)
    torch.manual_seed(2)
    mel = json.loads((Path(mel_vocoder) / "config.json").read_text())["mel"]
    meta = flow_export_meta(c, mel, {"units_fingerprint": fingerprint or units["fingerprint"],
                                     "units_from": str(stage1), "units_kind": units["kind"]})
    return write_export(out, kind="flow_decoder", config=config_dict(c), state_dict=FlowDecoder(c).state_dict(),
                        extra=meta, files={"mel_vocoder": copy_vocoder(Path(mel_vocoder))})
