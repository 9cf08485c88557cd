"""Stage-4 data: whole spoken dialogues as supervised fine-tuning sequences, in one of two modes.

The prepared utterances (one item per turn: ``dialogue_id``, ``turn``, ``role``, ``text``, ``language``, audio) are
grouped by dialogue and ordered by turn into exchanges (a user turn and the agent's answer). One training sequence per
dialogue covers all its exchanges, history first; the loss is on every assistant part (``text.templates`` masks).
- ``discrete`` (GLM-4-Voice, seed 003 §2.3.2, Appendix F): ``glm_dialogue`` with the user's and the agent's speech
  tokens (``tokenize`` of the stage-1 export, run if missing) and ``template`` "text_guided", "direct" or "streaming".
- ``continuous`` (KE-Omni, seed 000 §4): ``keomni_dialogue``; each user turn is stored as 16 kHz audio and takes
  ``nn.adapter.speech_frames(samples, stack)`` ``<|pad|>`` slots, exactly the frames the encoder + adapter produce.
- ``target="transcript"`` (continuous; adapter alignment): one sequence per answered user turn whose answer is the
  user's own words, under ``KEOMNI_TRANSCRIBE_PROMPT``, in ``sft_dir/continuous_transcript``. ``transcript_fraction``
  mixes that share of such sequences into the dialogues' training batches (``Mixture``; mixed batches are no longer
  grouped by length); validation stays on the dialogues.
``build_missing`` writes the dialogue-level chunks to ``sft_dir/<mode>/chunks/{train,val}`` (val = the dialogues of
the val split), in this process (the items are small and already in memory), with a ``sft.json`` stamp of the
settings and counts; they are rebuilt when the settings, the tokenizer or the source data change. A dialogue longer than ``max_length`` is cut to its longest prefix of whole exchanges that
fits (counted in the stamp and logged); one whose first exchange alone is too long is left out (counted too).
Items are written in order of length in small chunks, so batches hold dialogues of similar length.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from litdata import StreamingDataLoader, StreamingDataset
from litdata.streaming.writer import BinaryWriter
from litdata.utilities.env import _DistributedEnv

from datamodules.streaming import SPLITS, Mixture, ResumableLoader, StreamingDataModule, chunks_dir
from datamodules.tokenizer import asr_example
from lit_keomni.atomic import staged_dir, write_json
from lit_keomni.audio import SAMPLE_RATE
from lit_keomni.checkpoints import lm_tokenizer
from lit_keomni.nn.adapter import speech_frames
from lit_keomni.nn.keomni import llm_tokenizer
from lit_keomni.speech_tokens import STAMP as TOKENS_STAMP, tokenize, tokens_are_current
from lit_keomni.text.templates import (KEOMNI_TRANSCRIBE_PROMPT, Exchange, check_sft_options, glm_dialogue,
                                       keomni_dialogue, pad_batch)
from lit_keomni.text.tokenizer import SPEECH_SLOT, TextTokenizer

log = logging.getLogger(__name__)

STAMP = "sft.json"
USER_ROLES = ("user",)
ANSWER_ROLES = ("agent", "assistant")


def sft_tokenizer(speech_export: str, tokenizer: str | None = None, mode: str = "discrete") -> TextTokenizer:
    """The vocabulary the SFT sequences are written in. Continuous mode: ``tokenizer`` (an LLM's own vocabulary)
    with the role tokens. Discrete mode, or no ``tokenizer``: the speech-extended vocabulary of ``lm_tokenizer``
    (``tokenizer``, e.g. glm-4-voice-9b's own, or else the stage-1 export's)."""
    if tokenizer and mode == "continuous":
        return llm_tokenizer(tokenizer)
    return lm_tokenizer(speech_export, tokenizer)[0]


def vocabulary_digest(tokenizer: TextTokenizer) -> str:
    """SHA-256 of a tokenizer's token -> id map (equal maps, equal ids for every sequence)."""
    vocab = sorted(tokenizer.backend.get_vocab(with_added_tokens=True).items())
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode("utf-8")).hexdigest()


def group_exchanges(turns: list[dict[str, Any]]) -> tuple[list[tuple[dict, dict]], int]:
    """Utterance items of one dialogue -> (user, answer) pairs in turn order, and the number of turns left unpaired
    (an answer without a question, a question without an answer, or a question followed by another question)."""
    pairs, unpaired, question = [], 0, None
    for item in sorted(turns, key=lambda t: int(t["turn"])):
        if item["role"] in USER_ROLES:
            unpaired += question is not None
            question = item
        elif item["role"] in ANSWER_ROLES:
            if question is None:
                unpaired += 1
            else:
                pairs.append((question, item))
                question = None
        else:
            raise ValueError(f"utterance {item['id']}: field 'role' is {item['role']!r}, expected one of "
                             f"{USER_ROLES + ANSWER_ROLES}")
    return pairs, unpaired + (question is not None)


def _pcm16k(item: dict[str, Any]) -> np.ndarray:
    """A prepared utterance's audio resampled to 16 kHz, as int16."""
    audio = asr_example(item)["audio"].numpy()
    return np.clip(np.round(audio * 32768.0), -32768, 32767).astype(np.int16)


def write_items(items: list[dict[str, Any]], out_dir: Path, *, chunk_bytes: str) -> None:
    """Finished items -> litdata chunks at ``out_dir``, in this process and in order, renamed into place when
    complete (``write_chunks`` runs a function over inputs in spawned workers; items in memory need no worker)."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with staged_dir(out_dir) as tmp:
        writer = BinaryWriter(str(tmp), chunk_bytes=chunk_bytes)
        # One writer in one process, also inside a distributed job (prepare_data runs on one rank per node): the
        # writer would otherwise take the job's rank and wait for an index from every rank before merging.
        writer._distributed_env, writer._rank = _DistributedEnv(world_size=1, global_rank=0, num_nodes=1), 0
        for i, item in enumerate(items):
            writer.add_item(i, item)
        writer.done()
        writer.merge()


class DialogueBuilder:
    """Renders one dialogue's exchanges into an SFT item, cutting it to whole exchanges that fit ``max_length``."""

    def __init__(self, mode: str, tokenizer: TextTokenizer, *, template: str, max_length: int, stack: int,
                 target: str = "answer") -> None:
        self.mode, self.tokenizer, self.template, self.max_length, self.stack = mode, tokenizer, template, max_length, stack
        self.target = target

    def render(self, exchanges: list[Exchange]) -> tuple[list[int], list[bool]]:
        if self.mode == "discrete":
            return glm_dialogue(self.tokenizer, exchanges, self.template)
        if self.target == "transcript":
            return keomni_dialogue(self.tokenizer, exchanges, KEOMNI_TRANSCRIBE_PROMPT)
        return keomni_dialogue(self.tokenizer, exchanges)

    def units(self, dialogue_id: str, pairs: list[tuple[dict, dict]]) -> list[tuple[str, list[tuple[dict, dict]]]]:
        """The training sequences one dialogue gives: the whole dialogue; with ``target="transcript"`` one per user
        turn (id ``<dialogue>.<k>``), whose answer is the user's own words."""
        if self.target == "answer":
            return [(dialogue_id, pairs)]
        return [(f"{dialogue_id}.{k}", [(q, q)]) for k, (q, _) in enumerate(pairs)]

    def __call__(self, dialogue_id: str, pairs: list[tuple[dict, dict]]) -> tuple[dict[str, Any] | None, int]:
        """(item or None when even the first exchange is too long, number of exchanges cut off)."""
        audio: list[np.ndarray] = []
        if self.mode == "discrete":
            exchanges = [Exchange(user_codes=q["codes"].tolist(), text=a["text"], codes=a["codes"].tolist()) for q, a in pairs]
        else:
            exchanges = []
            for q, a in pairs:
                pcm = _pcm16k(q)
                frames = speech_frames(len(pcm), self.stack)
                if frames < 1:
                    raise ValueError(f"utterance {q['id']} (dialogue {dialogue_id}): {len(pcm) / SAMPLE_RATE:.3f} s "
                                     f"of audio is shorter than one adapter frame ({self.stack * 20} ms)")
                audio.append(pcm)
                exchanges.append(Exchange(user_frames=frames, text=a["text"]))
        for k in range(len(exchanges), 0, -1):
            ids, mask = self.render(exchanges[:k])
            if len(ids) - 1 <= self.max_length:
                break
        else:
            return None, len(exchanges)
        item: dict[str, Any] = {
            "id": dialogue_id,
            "ids": np.asarray(ids, dtype=np.int32),
            "mask": np.asarray(mask, dtype=np.uint8),
            "exchanges": k,
            "answers": json.dumps([a["text"] for _, a in pairs[:k]], ensure_ascii=False),
            "language": pairs[k - 1][1]["language"],
        }
        if self.mode == "continuous":
            item["speech"] = (item["ids"] == self.tokenizer.token_to_id(SPEECH_SLOT)).astype(np.uint8)
            item["audio"] = np.concatenate(audio[:k])
            item["audio_lengths"] = np.asarray([len(a) for a in audio[:k]], dtype=np.int32)
        return item, len(exchanges) - k


def build_dialogues(source: Path, builder: DialogueBuilder) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Every dialogue of the utterance chunks at ``source`` as SFT items (``DialogueBuilder.units``; ordered by
    length), and the counts."""
    ds = StreamingDataset(str(source))
    # Every item, also when run in a distributed job: len(ds) would count this rank's share only.
    total = sum(c["chunk_size"] for c in json.loads((source / "index.json").read_text())["chunks"])
    by_dialogue: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for i in range(total):
        item = ds[i]
        by_dialogue[item["dialogue_id"]].append(item)
    items: list[dict[str, Any]] = []
    stats = dict(dialogues=0, exchanges=0, unpaired_turns=0, truncated_dialogues=0, dropped_exchanges=0,
                 dropped_dialogues=0, longest=0)
    for dialogue_id in sorted(by_dialogue):
        pairs, unpaired = group_exchanges(by_dialogue[dialogue_id])
        stats["unpaired_turns"] += unpaired
        if not pairs:
            stats["dropped_dialogues"] += 1
            continue
        for unit_id, unit in builder.units(dialogue_id, pairs):
            item, cut = builder(unit_id, unit)
            stats["dropped_exchanges"] += cut
            if item is None:
                stats["dropped_dialogues"] += 1
                continue
            stats["truncated_dialogues"] += cut > 0
            stats["dialogues"] += 1
            stats["exchanges"] += item["exchanges"]
            stats["longest"] = max(stats["longest"], len(item["ids"]) - 1)
            items.append(item)
    items.sort(key=lambda it: (len(it["ids"]), it["id"]))
    return items, stats


def discrete_collate(examples: list[dict[str, Any]]) -> dict[str, Any]:
    """GLM-mode batch: right-padded ``input``/``target`` (untrained targets -100)."""
    idx, target = pad_batch([(e["ids"].tolist(), e["mask"].astype(bool).tolist()) for e in examples], 0)
    return {"input": idx, "target": target, "n_tokens": int(sum(len(e["ids"]) - 1 for e in examples)),
            "id": [e["id"] for e in examples], "language": [e["language"] for e in examples],
            "answers": [json.loads(e["answers"]) for e in examples]}


def continuous_collate(examples: list[dict[str, Any]]) -> dict[str, Any]:
    """KE-Omni-mode batch: ``input``/``target`` and ``speech_mask`` (B, T) of the slots; ``audio`` (N, S) float of
    all N user turns of the batch in the order their slots appear (row 0's turns first), ``audio_lengths`` (N,),
    ``turn_row`` (N,) the row each turn belongs to."""
    batch = discrete_collate(examples)
    T = max(len(e["ids"]) for e in examples)
    speech = torch.zeros(len(examples), T, dtype=torch.bool)
    wavs, rows = [], []
    for i, e in enumerate(examples):
        speech[i, : len(e["speech"])] = torch.from_numpy(e["speech"].astype(bool))
        for pcm in np.split(e["audio"], np.cumsum(e["audio_lengths"])[:-1]):
            wavs.append(torch.from_numpy(pcm.astype(np.float32) / 32768.0))
            rows.append(i)
    lengths = torch.tensor([len(w) for w in wavs])
    audio = torch.zeros(len(wavs), int(lengths.max()))
    for i, w in enumerate(wavs):
        audio[i, : len(w)] = w
    batch.update(speech_mask=speech[:, :-1], audio=audio, audio_lengths=lengths, turn_row=torch.tensor(rows))
    return batch


class SFTDataModule(StreamingDataModule):
    """Dialogues of the prepared corpus as SFT sequences (``mode`` discrete: GLM-4-Voice; continuous: KE-Omni)."""

    def __init__(self, mode: str = "discrete", speech_export: str = "checkpoints/stage1/export",
                 tokenizer: str | None = None, tokens_dir: str = "data/tokens", sft_dir: str = "data/sft",
                 template: str = "text_guided", max_length: int = 640, stack: int = 5, target: str = "answer",
                 transcript_fraction: float = 0.0, tokenize_workers: int = 1, **kwargs: Any) -> None:
        """
        Args:
            mode: "discrete" (speech tokens in and out, GLM-4-Voice templates) or "continuous" (KE-Omni: user audio
                into speech slots, text answers).
            speech_export: Stage-1 export: its speech tokens (discrete) and its speech-extended tokenizer.
            tokenizer: Continuous mode only: an LLM's tokenizer.json (e.g. a Hugging Face Llama folder's) to write
                the sequences in instead of the stage-1 export's; must be the model's ``tokenizer`` too.
            tokens_dir: Speech-token chunks of ``data_dir`` (discrete; made by ``tokenize`` if missing or stale).
            sft_dir: Where the dialogue-level chunks go (``sft_dir/<mode>/chunks/{train,val}``).
            template: Discrete mode: "text_guided" (text answer, then its speech), "direct" (speech answer only)
                or "streaming" (13 text / 26 speech tokens interleaved, as the released glm-4-voice-9b answers).
            max_length: Longest training sequence in tokens (model input positions); at most the LM's block_size.
            stack: Continuous mode: the adapter's frame stacking (KE-Omni: 5, 50 Hz -> 10 Hz); must be the model's.
            target: Continuous mode: "answer" (the dialogue, SFT) or "transcript" (adapter alignment: one sequence
                per user turn, the answer being that turn's own text, under ``KEOMNI_TRANSCRIBE_PROMPT``; chunks
                under ``sft_dir/continuous_transcript``).
            transcript_fraction: Continuous mode, target "answer": this share of the training sequences are
                transcript sequences (both sets are built), so the adapter keeps carrying the words while the LLM
                learns to answer; validation stays on the dialogues.
            tokenize_workers: Processes for a ``tokenize`` run.
            **kwargs: ``StreamingDataModule`` options (data_dir, batch_size, num_workers, ...).
        """
        super().__init__(**kwargs)
        check_sft_options("SFTDataModule", mode, template, tokenizer, target)
        if max_length < 1 or stack < 1:
            raise ValueError(f"SFTDataModule: max_length={max_length} and stack={stack} must be >= 1")
        self.mode, self.speech_export, self.tokenizer_file = mode, speech_export, tokenizer
        self.tokens_dir, self.sft_dir, self.template = tokens_dir, sft_dir, template
        self.max_length, self.stack, self.tokenize_workers = max_length, stack, tokenize_workers
        if transcript_fraction and (mode, target) != ("continuous", "answer"):
            raise ValueError(f"SFTDataModule: transcript_fraction mixes transcripts into continuous-mode answers; "
                             f"got mode={mode!r}, target={target!r}")
        if not 0.0 <= transcript_fraction < 1.0:
            raise ValueError(f"SFTDataModule: transcript_fraction={transcript_fraction} must be in [0, 1)")
        self.target, self.transcript_fraction = target, transcript_fraction
        self.collate = discrete_collate if mode == "discrete" else continuous_collate
        self._tokenizer: TextTokenizer | None = None

    @property
    def tokenizer(self) -> TextTokenizer:
        if self._tokenizer is None:
            self._tokenizer = sft_tokenizer(self.speech_export, self.tokenizer_file, self.mode)
        return self._tokenizer

    def chunks_root(self, target: str | None = None) -> str:
        target = target or self.target
        return str(Path(self.sft_dir) / (self.mode if target == "answer" else f"{self.mode}_{target}"))

    def _source(self) -> Path:
        return Path(self.tokens_dir if self.mode == "discrete" else self.data_dir)

    def settings(self, target: str | None = None) -> dict[str, Any]:
        """What the built chunks (of ``target``, default this module's) depend on; other settings mean rebuild."""
        target = target or self.target
        source = self._source() / (TOKENS_STAMP if self.mode == "discrete" else "prepared.json")
        return {"mode": self.mode, "template": self.template if self.mode == "discrete" else None,
                "max_length": self.max_length, "stack": self.stack if self.mode == "continuous" else None,
                "tokenizer": vocabulary_digest(self.tokenizer),
                "source": hashlib.sha256(source.read_bytes()).hexdigest(),
                **({"target": target, "prompt": KEOMNI_TRANSCRIBE_PROMPT} if target == "transcript" else {})}

    def build_missing(self) -> None:
        super().build_missing()
        if self.mode == "discrete" and not tokens_are_current(self.tokens_dir, self.speech_export):
            tokenize(self.speech_export, self.data_dir, self.tokens_dir, workers=self.tokenize_workers)
        for target in dict.fromkeys([self.target] + (["transcript"] if self.transcript_fraction else [])):
            self._build(target)

    def _build(self, target: str) -> None:
        """Write the chunks of ``target`` unless their stamp shows they are current."""
        out = Path(self.chunks_root(target))
        settings = self.settings(target)
        stamp = out / STAMP
        if stamp.is_file() and {k: v for k, v in json.loads(stamp.read_text()).items() if k != "counts"} == settings:
            return
        stamp.unlink(missing_ok=True)
        builder = DialogueBuilder(self.mode, self.tokenizer, template=self.template, max_length=self.max_length,
                                  stack=self.stack, target=target)
        counts = {}
        for split in SPLITS:
            items, counts[split] = build_dialogues(chunks_dir(self._source(), split), builder)
            if not items:
                raise ValueError(f"{chunks_dir(self._source(), split)}: no dialogue with a user turn and an answer "
                                 f"fits max_length={self.max_length} ({counts[split]})")
            c = counts[split]
            if c["truncated_dialogues"] or c["dropped_dialogues"] or c["unpaired_turns"]:
                log.warning("SFT %s/%s: %d dialogues cut to fit max_length=%d (%d exchanges dropped), %d dialogues "
                            "left out, %d unpaired turns; see %s", self.mode, split, c["truncated_dialogues"],
                            self.max_length, c["dropped_exchanges"], c["dropped_dialogues"], c["unpaired_turns"], stamp)
            write_items(items, chunks_dir(out, split), chunk_bytes="256KB" if self.mode == "discrete" else "4MB")
        write_json(stamp, {**settings, "counts": counts})

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        if self.transcript_fraction and "transcript" not in self.datasets:
            self.datasets["transcript"] = self.dataset("train", self.chunks_root("transcript"))

    def train_dataloader(self) -> StreamingDataLoader:
        """The dialogues; with ``transcript_fraction``, mixed with that share of transcript sequences (``Mixture``: an
        epoch ends when either source runs out)."""
        if not self.transcript_fraction:
            return super().train_dataloader()
        f = self.transcript_fraction
        mixture = Mixture([self.datasets["train"], self.datasets["transcript"]], [1.0 - f, f], self.seed)
        return ResumableLoader(mixture, batch_size=self.batch_size, num_workers=self.num_workers,
                               collate_fn=self.collate, drop_last=True)
