"""Speech in, streamed speech out: the two spoken-dialogue pipelines, timed, from exports only.

    python -m lit_keomni chat --pipeline keomni --model checkpoints/stage4_keomni/export \
        --duration checkpoints/stage5/export --unit-generator checkpoints/stage6/export \
        --vocoder checkpoints/stage7/export question.wav --out chat_out --json chat.json
    python -m lit_keomni chat --pipeline glm --model checkpoints/stage4/export --vocoder checkpoints/stage7/export \
        question.wav

- ``keomni.py``: KE-Omni (seed 000 §4, §4.3): speech -> encoder + adapter -> LLM writing the text answer, whose
  hidden states go every ``text_chunk`` tokens through the duration predictor and unit generator to the vocoder.
- ``glm.py``: GLM-4-Voice (seed 003 §2.4, Appendix F): speech -> stage-1 speech tokens -> LM writing text and speech
  tokens, vocoded in blocks of 25.
- ``streaming.py``: what both share while answering: the per-request ``Clock`` (time to first audio, seconds per
  component), ``UnitStream`` (units vocoded as they arrive, exactly as one vocoder pass) and ``ChatResult``.
- ``decoding.py``: one sequence in an LLM's KV cache and the next token sampled from it.
- ``checks.py``: every export is checked against the others before any weight is loaded: one error names the file,
  the field, what it holds and what the other export expects.
- ``inputs.py``: question files (any rate or channels) read as mono 16 kHz.
- ``asr_check.py``: the stage-1 ASR model reads the produced audio back (CER against the text answer), timed apart.
- ``cli.py``: the ``chat`` command.
"""

from lit_keomni.chat.asr_check import AsrCheck, answer_language
from lit_keomni.chat.checks import expect_field
from lit_keomni.chat.cli import add_arguments, build, main, run
from lit_keomni.chat.glm import GLM_BLOCK, GlmChat
from lit_keomni.chat.inputs import input_files, read_input
from lit_keomni.chat.keomni import KeOmniChat
from lit_keomni.chat.streaming import ChatResult, Clock, UnitStream

__all__ = ["GLM_BLOCK", "AsrCheck", "ChatResult", "Clock", "GlmChat", "KeOmniChat", "UnitStream", "add_arguments",
           "answer_language", "build", "expect_field", "input_files", "main", "read_input", "run"]
