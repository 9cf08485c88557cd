"""Stage-2 data: (text, speech tokens) pairs as text-to-token sequences with a loss mask on the speech side.

``prepare_data`` chains what is missing: the prepared utterances (``data_dir``), then ``tokenize`` with the stage-1
export into ``tokens_dir``. Sequences are ``text <|begin_of_audio|> speech <|end_of_audio|>`` (``text.templates.tts``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from datamodules.streaming import STAMP, StreamingDataModule, is_remote
from lit_keomni.checkpoints import lm_tokenizer
from lit_keomni.speech_tokens import tokenize, tokens_are_current
from lit_keomni.text.templates import pad_batch, tts


class TTSExample:
    """Picklable transform: a tokenized utterance -> {ids, mask, text, language, codes}; loads the LM vocabulary
    (``lm_tokenizer``) once per worker."""

    def __init__(self, speech_export: str, vocabulary: str | None = None) -> None:
        self.speech_export = speech_export
        self.vocabulary = vocabulary
        self._tokenizer = None

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer, _ = lm_tokenizer(self.speech_export, self.vocabulary)
        return self._tokenizer

    def __call__(self, item: dict[str, Any]) -> dict[str, Any]:
        ids, mask = tts(self.tokenizer, item["text"], item["codes"].tolist())
        return {"id": item["id"], "ids": ids, "mask": mask, "text": item["text"], "language": item["language"],
                "codes": item["codes"]}


def tts_collate(examples: list[dict[str, Any]], pad_id: int = 0) -> dict[str, Any]:
    idx, target = pad_batch([(e["ids"], e["mask"]) for e in examples], pad_id)
    return {"input": idx, "target": target, "n_tokens": int(sum(len(e["ids"]) - 1 for e in examples)),
            "text": [e["text"] for e in examples], "language": [e["language"] for e in examples],
            "codes": [torch.as_tensor(e["codes"]) for e in examples], "id": [e["id"] for e in examples]}


class TextToTokenDataModule(StreamingDataModule):
    """Text -> speech-token pairs from every utterance of the prepared corpus, tokenized by the stage-1 export."""

    def __init__(self, speech_export: str = "checkpoints/stage1/export", tokens_dir: str = "data/tokens",
                 tokenize_workers: int = 1, tokenizer: str | None = None, **kwargs: Any) -> None:
        """
        Args:
            speech_export: Stage-1 export whose tokens (and tokenizer) this stage learns to produce.
            tokenizer: The LM's own vocabulary (a released LM folder); None = the stage-1 export's text tokenizer.
                The model must name the same.
            tokens_dir: Speech-token chunks of ``data_dir`` (made by ``tokenize`` if missing or from another export).
            tokenize_workers: Processes for that ``tokenize`` run.
            **kwargs: ``StreamingDataModule`` options (data_dir, batch_size, num_workers, sources, ...); with
                ``sources``, each corpus is tokenized into ``tokens_dir/<index>-<name>`` and drawn by weight.
        """
        super().__init__(**kwargs)
        self.speech_export = speech_export
        self.tokens_dir = tokens_dir
        self.tokenize_workers = tokenize_workers
        self.tokenizer_file = tokenizer
        self.transform = TTSExample(speech_export, tokenizer)

    def build_missing(self) -> None:
        super().build_missing()
        pairs = [(c["path"], self.source_root(c)) for c in self.mixture_sources] or [(self.data_dir, self.tokens_dir)]
        for data, tokens in pairs:
            if is_remote(data):
                raise ValueError(f"{data}: stage 2 tokenizes each corpus into tokens_dir and reads it locally; give "
                                 f"this data.sources entry a local prepared folder")
            stamp = Path(data) / STAMP
            if stamp.is_file() and not json.loads(stamp.read_text(encoding="utf-8")).get("transcribed", {"train": 1})["train"]:
                raise ValueError(f"{stamp}: field 'transcribed' is 0: stage 2 learns text -> speech and needs a "
                                 f"corpus with transcripts (unsupervised speech belongs to stage 3)")
            if not tokens_are_current(tokens, self.speech_export):
                tokenize(self.speech_export, data, tokens, workers=self.tokenize_workers)

    def chunks_root(self) -> str:
        return self.tokens_dir

    def source_root(self, entry: dict[str, Any]) -> str:
        """Speech tokens of one ``sources`` entry: ``tokens_dir/<index>-<name>``."""
        return str(Path(self.tokens_dir) / entry["name"])

    collate = staticmethod(tts_collate)
