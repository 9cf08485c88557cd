"""Stage-6 data: one agent speaker's answers as LLM hidden states, per-token durations and target units.

The same features as stage 5 (``datamodules.duration.build_features``: the frozen stage-4 KE-Omni export run
teacher-forced over each dialogue), read from ``decoder_dir/<speaker>``: the paper trains the speech decoder of each
agent speaker on that speaker's dialogues only (seed 000 §5.1).
"""

from __future__ import annotations

from typing import Any

from datamodules.duration import DecoderFeatureDataModule


class UnitGeneratorDataModule(DecoderFeatureDataModule):
    """Stage 6: hidden states, ground-truth durations and the turn's units (``codes``) of one agent speaker."""

    def __init__(self, speaker: str | None = "agentFemale", **kwargs: Any) -> None:
        """
        Args:
            speaker: The agent speaker whose voice the unit generator learns (the built-in corpus: "agentFemale" or
                "agentMale"); None = every agent turn.
            **kwargs: ``DecoderFeatureDataModule`` options (llm_from, units_from, tokens_dir, decoder_dir, ...).
        """
        super().__init__(speaker=speaker, **kwargs)
