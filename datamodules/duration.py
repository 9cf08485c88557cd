"""Stage-5 data, and the speech-decoder features stages 5 and 6 share (seed 000 §4.3, §5.1).

``build_features`` runs the frozen stage-4 KE-Omni export (``checkpoints.load_keomni``) teacher-forced over every
dialogue of the prepared corpus, exactly as stage 4 trains on it (``datamodules.sft.DialogueBuilder``, continuous
mode: the user's speech through encoder + adapter into its ``<|pad|>`` slots, the earlier exchanges as history),
and keeps one item per agent turn:
``hidden`` (T, n_embd) float16, the LLM's last hidden states at the input positions of the answer's T text tokens
(``<|eos|>`` excluded); ``ids`` (T,); ``durations`` (T,) unit frames per token (``lit_keomni.durations``, summing
to the turn's number of units); ``codes`` (F,) the turn's units (``tokens_dir``); ``id``, ``dialogue_id``,
``speaker``, ``language``, ``text``.
Items are written per speaker group, only for the dialogues it needs: ``decoder_dir/<speaker>`` (one agent voice,
as stages 5 and 6 train) or ``decoder_dir/all`` (every agent turn), each ``chunks/{train,val}`` with a
``decoder.json`` stamp recording the LLM's and the unit source's fingerprints (a changed export rebuilds) and the
training-set baselines (mean duration per token, most frequent unit).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from litdata import StreamingDataset

from datamodules.sft import ANSWER_ROLES, DialogueBuilder, continuous_collate, group_exchanges
from datamodules.streaming import SPLITS, StreamingDataModule, chunks_dir, write_items
from lit_keomni.atomic import write_json
from lit_keomni.checkpoints import export_fingerprint, load_keomni, read_export_meta, unit_meta
from lit_keomni.durations import answer_durations
from lit_keomni.speech_tokens import STAMP as TOKENS_STAMP, tokenize, tokens_are_current

STAMP = "decoder.json"
ALL = "all"
FEATURES_VERSION = 1


def _items(source: Path) -> list[dict[str, Any]]:
    ds = StreamingDataset(str(source))
    total = sum(c["chunk_size"] for c in json.loads((source / "index.json").read_text())["chunks"])
    return [ds[i] for i in range(total)]


def _answer_runs(mask: list[bool]) -> list[list[int]]:
    """Positions of each trained run (an answer's text tokens and its ``<|eos|>``), in order."""
    runs: list[list[int]] = []
    for p, m in enumerate(mask):
        if m and (not runs or runs[-1][-1] != p - 1):
            runs.append([p])
        elif m:
            runs[-1].append(p)
    return runs


@torch.no_grad()
def dialogue_features(model: Any, batch: dict[str, Any]) -> torch.Tensor:
    """The frozen KE-Omni's last hidden states (B, T, n_embd) over a ``continuous_collate`` batch (teacher-forced)."""
    mel, mel_lengths = model.logmel(batch["audio"], batch["audio_lengths"])
    return model(batch["input"], batch["speech_mask"], mel, mel_lengths, return_hidden=True)


def build_split(model: Any, tokenizer: Any, prepared: Path, tokens: Path, frame_rate: float, *,
                speaker: str | None = None, batch_size: int = 8) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every agent turn of one split (of ``speaker``'s voice, or all) as a feature item (see the module
    docstring), and counts; only the dialogues with such a turn are run through the LLM."""
    codes = {it["id"]: it["codes"] for it in _items(tokens) if it["role"] in ANSWER_ROLES}
    by_dialogue: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for item in _items(prepared):
        by_dialogue[item["dialogue_id"]].append(item)
    builder = DialogueBuilder("continuous", tokenizer, template="text_guided", max_length=model.llm.config.block_size,
                              stack=model.stack)
    dialogues: list[tuple[dict[str, Any], list[tuple[dict, dict]]]] = []
    stats: dict[str, Any] = dict(agent_turns=0, dropped_turns=0, speakers=set())
    for dialogue_id in sorted(by_dialogue):
        pairs, _ = group_exchanges(by_dialogue[dialogue_id])
        stats["speakers"].update(a["speaker"] for _, a in pairs)
        if not any(speaker in (None, a["speaker"]) for _, a in pairs):
            continue
        item, cut = builder(dialogue_id, pairs)
        stats["dropped_turns"] += cut if item is not None else len(pairs)
        if item is not None:
            dialogues.append((item, pairs[: item["exchanges"]]))
    dialogues.sort(key=lambda d: len(d[0]["ids"]))  # batches of similar length: little padding in the LLM pass
    out: list[dict[str, Any]] = []
    eos = tokenizer.eos_id
    for start in range(0, len(dialogues), batch_size):
        chunk = dialogues[start : start + batch_size]
        batch = continuous_collate([d for d, _ in chunk])
        hidden = dialogue_features(model, batch)
        for row, (item, pairs) in enumerate(chunk):
            ids = item["ids"].tolist()
            runs = _answer_runs(item["mask"].astype(bool).tolist())
            for run, (_, agent) in zip(runs, pairs):
                if speaker not in (None, agent["speaker"]):
                    continue
                where = f"{prepared}: utterance {agent['id']}"
                if agent["id"] not in codes:
                    raise ValueError(f"{tokens}: no units (field 'codes') for utterance {agent['id']}")
                units = np.asarray(codes[agent["id"]], dtype=np.int32)
                text_pos = run[:-1] if ids[run[-1]] == eos else run
                token_ids, frames = answer_durations(tokenizer, agent["text"], agent["words"], agent["language"],
                                                     len(units), frame_rate, source=where)
                if [ids[p] for p in text_pos] != token_ids:
                    raise ValueError(f"{where}: the answer's tokens in the dialogue differ from its text's tokens "
                                     f"(field 'text' {agent['text']!r})")
                out.append({
                    "id": agent["id"], "dialogue_id": agent["dialogue_id"], "speaker": agent["speaker"],
                    "language": agent["language"], "text": agent["text"],
                    "hidden": hidden[row, text_pos].to(torch.float16).cpu().numpy(),
                    "ids": np.asarray(token_ids, dtype=np.int32),
                    "durations": np.asarray(frames, dtype=np.int32),
                    "codes": units,
                })
    stats["agent_turns"] = len(out)
    stats["speakers"] = sorted(stats["speakers"])
    return out, stats


def baselines(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Training-set baselines: mean duration per token (frames) and the most frequent unit with its share."""
    durations = np.concatenate([it["durations"] for it in items])
    units = Counter(int(u) for it in items for u in it["codes"])
    unit, count = units.most_common(1)[0]
    return {"mean_duration": float(durations.mean()), "top_unit": unit, "top_unit_share": count / sum(units.values()),
            "tokens": int(len(durations)), "frames": int(sum(units.values())), "turns": len(items)}


def feature_settings(llm_from: str, units_from: str, data_dir: str, tokens_dir: str,
                     speaker: str | None) -> dict[str, Any]:
    """What the features depend on; a stamp with other settings means rebuild."""
    units = unit_meta(units_from)
    return {"version": FEATURES_VERSION, "speaker": speaker, "llm_fingerprint": export_fingerprint(llm_from),
            "units_fingerprint": units["fingerprint"], "frame_rate": units["frame_rate"],
            "num_units": units["num_units"],
            "data": hashlib.sha256((Path(data_dir) / "prepared.json").read_bytes()).hexdigest(),
            "tokens": hashlib.sha256((Path(tokens_dir) / TOKENS_STAMP).read_bytes()).hexdigest()}


def build_features(llm_from: str, units_from: str, data_dir: str, tokens_dir: str, out: str, *,
                   speaker: str | None = None, batch_size: int = 8) -> dict[str, Any]:
    """Write ``out/chunks/{train,val}`` (the agent turns of ``speaker``, or all) and ``out/decoder.json``;
    returns the stamp."""
    out_dir = Path(out)
    settings = feature_settings(llm_from, units_from, data_dir, tokens_dir, speaker)
    (out_dir / STAMP).unlink(missing_ok=True)
    torch.manual_seed(0)
    model, tokenizer, _ = load_keomni(llm_from, answers=True)
    counts, splits = {}, {}
    for split in SPLITS:
        items, counts[split] = build_split(model, tokenizer, chunks_dir(data_dir, split),
                                           chunks_dir(tokens_dir, split), settings["frame_rate"], speaker=speaker,
                                           batch_size=batch_size)
        if not items:
            raise ValueError(f"{chunks_dir(data_dir, split)}: no agent turns of speaker {speaker!r} (field "
                             f"'speaker'; agent speakers there: {counts[split]['speakers']}); check data.speaker")
        items.sort(key=lambda it: (len(it["codes"]), it["id"]))  # similar lengths per chunk: little padding
        write_items(items, chunks_dir(out_dir, split), chunk_bytes="4MB")
        splits[split] = items
    stamp = {**settings, "llm_from": str(Path(llm_from).resolve()), "units_from": str(Path(units_from).resolve()),
             "hidden_size": model.llm.config.n_embd, "counts": counts, "baselines": baselines(splits["train"])}
    write_json(out_dir / STAMP, stamp)
    return stamp


def decoder_collate(examples: list[dict[str, Any]]) -> dict[str, Any]:
    """Batch: ``hidden`` (B, T, d) float32, ``ids``/``durations`` (B, T) long and ``mask`` (B, T) bool over tokens;
    ``codes`` (B, F) long and ``frame_mask`` (B, F) over units; ``id``, ``speaker``, ``language``, ``text`` lists."""
    B = len(examples)
    T = max(len(e["ids"]) for e in examples)
    F = max(len(e["codes"]) for e in examples)
    d = examples[0]["hidden"].shape[-1]
    batch = {"hidden": torch.zeros(B, T, d), "ids": torch.zeros(B, T, dtype=torch.long),
             "durations": torch.zeros(B, T, dtype=torch.long), "mask": torch.zeros(B, T, dtype=torch.bool),
             "codes": torch.zeros(B, F, dtype=torch.long), "frame_mask": torch.zeros(B, F, dtype=torch.bool)}
    for i, e in enumerate(examples):
        n, f = len(e["ids"]), len(e["codes"])
        batch["hidden"][i, :n] = torch.from_numpy(np.asarray(e["hidden"], dtype=np.float32))
        batch["ids"][i, :n] = torch.from_numpy(e["ids"].astype(np.int64))
        batch["durations"][i, :n] = torch.from_numpy(e["durations"].astype(np.int64))
        batch["mask"][i, :n] = True
        batch["codes"][i, :f] = torch.from_numpy(e["codes"].astype(np.int64))
        batch["frame_mask"][i, :f] = True
    for key in ("id", "speaker", "language", "text"):
        batch[key] = [e[key] for e in examples]
    batch["n_tokens"] = int(batch["mask"].sum())
    return batch


class DecoderFeatureDataModule(StreamingDataModule):
    """Speech-decoder features (see the module docstring) of one agent speaker or of all; built if missing/stale."""

    def __init__(self, llm_from: str = "checkpoints/stage4_keomni/export",
                 units_from: str = "checkpoints/stage1/export", tokens_dir: str = "data/tokens", decoder_dir: str = "data/decoder", speaker: str | None = None,
                 build_batch_size: int = 8, tokenize_workers: int = 1, **kwargs: Any) -> None:
        """
        Args:
            llm_from: The frozen stage-4 KE-Omni export (kind keomni_lm) whose last hidden states are the input.
            units_from: Unit source: the stage-1 export (its speech tokens, the default) or a ``units`` export.
            tokens_dir: The corpus's unit sequences (data/tokens layout); for the stage-1 source written by
                ``tokenize`` when missing or stale, for a ``units`` export by ``python -m lit_keomni units apply``.
            decoder_dir: Where the features go (``<decoder_dir>/<speaker or all>/chunks/{train,val}``, with
                ``decoder.json``).
            speaker: Agent speaker to train on (e.g. "agentFemale"); None = every agent turn.
            build_batch_size: Dialogues per LLM forward while building the features.
            tokenize_workers: Processes for a ``tokenize`` run.
            **kwargs: ``StreamingDataModule`` options (data_dir, batch_size, num_workers, ...).
        """
        super().__init__(**kwargs)
        self.llm_from, self.units_from, self.tokens_dir = llm_from, units_from, tokens_dir
        self.decoder_dir, self.speaker = decoder_dir, speaker
        self.build_batch_size, self.tokenize_workers = build_batch_size, tokenize_workers

    collate = staticmethod(decoder_collate)

    def chunks_root(self) -> str:
        return str(Path(self.decoder_dir) / (self.speaker or ALL))

    def _check_units(self) -> None:
        meta = unit_meta(self.units_from)
        if meta["kind"] == "speech_tokenizer":
            if not tokens_are_current(self.tokens_dir, self.units_from):
                tokenize(self.units_from, self.data_dir, self.tokens_dir, workers=self.tokenize_workers)
            return
        stamp = Path(self.tokens_dir) / TOKENS_STAMP
        if not stamp.is_file():
            raise FileNotFoundError(f"{stamp}: missing; write the units of {self.data_dir} with "
                                    f"`python -m lit_keomni units apply` of {self.units_from}")
        found = json.loads(stamp.read_text()).get("fingerprint")
        if found != meta["fingerprint"]:
            raise ValueError(f"{stamp}: field 'fingerprint' is {found!r}, but the unit source {self.units_from} has "
                             f"{meta['fingerprint']!r}; re-apply its units to {self.data_dir}")

    def stamp(self) -> dict[str, Any] | None:
        path = Path(self.chunks_root()) / STAMP
        return json.loads(path.read_text()) if path.is_file() else None

    def build_missing(self) -> None:
        super().build_missing()
        read_export_meta(self.llm_from, "keomni_lm")
        self._check_units()
        settings = feature_settings(self.llm_from, self.units_from, self.data_dir, self.tokens_dir, self.speaker)
        stamp = self.stamp()
        if stamp is None or any(stamp.get(k) != v for k, v in settings.items()):
            build_features(self.llm_from, self.units_from, self.data_dir, self.tokens_dir, self.chunks_root(),
                           speaker=self.speaker, batch_size=self.build_batch_size)

    def baselines(self) -> dict[str, Any]:
        """Training-set baselines of these features: ``mean_duration`` (frames per token), ``top_unit``."""
        stamp = self.stamp()
        if stamp is None:
            raise FileNotFoundError(f"{Path(self.chunks_root()) / STAMP}: missing; features not built yet")
        return stamp["baselines"]

    def check_handoff(self, model: dict[str, Any]) -> None:
        """A model trained on these features must name the same LLM and unit source: ``model`` is its
        ``checkpoints.decoder_handoff``; a mismatch is one error naming the stamp and the field."""
        stamp = self.stamp() or {}
        for field in ("llm_fingerprint", "units_fingerprint", "hidden_size", "num_units", "frame_rate"):
            if field in stamp and model.get(field) != stamp[field]:
                raise ValueError(f"{Path(self.chunks_root()) / STAMP}: field '{field}' is {stamp[field]!r}, but the "
                                 f"model's llm_from/units_from give {model.get(field)!r}; name the same exports in "
                                 f"model and data")


class DurationDataModule(DecoderFeatureDataModule):
    """Stage 5: answers' hidden states and per-token duration targets (``durations``)."""
