"""The checks that a chat's exports belong together, made before any weight is loaded: one error names the file, the
field, what it holds and what the other export expects; and the one-speaker vocoder both pipelines load."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from lit_keomni.checkpoints import CONFIG_FILE


def export_field(meta: Mapping[str, Any], name: str) -> Any:
    """A handoff field of an export's config.json: top level, else inside ``config``."""
    return meta[name] if name in meta else meta.get("config", {}).get(name)


def expect_field(path: str | Path, meta: Mapping[str, Any], name: str, want: Any, what: str) -> None:
    """Raise naming ``path``'s config.json, the field, its value and ``want`` (``what``: where ``want`` comes from)."""
    found = export_field(meta, name)
    if isinstance(want, float) and isinstance(found, (int, float)) and abs(found - want) < 1e-9:
        return
    if found != want:
        raise ValueError(f"{Path(path) / CONFIG_FILE}: field '{name}' is {found!r}, expected {want!r} ({what}); "
                         f"these exports do not belong together")


def load_chat_vocoder(path: str | Path, device: torch.device) -> tuple[Any, dict[str, Any]]:
    """The vocoder export at ``path`` on ``device`` in eval mode, and its meta; refused when it has several speakers."""
    from lit_keomni.checkpoints import load_vocoder

    vocoder, meta = load_vocoder(path)
    if vocoder.config.num_speakers:
        raise ValueError(f"{Path(path) / CONFIG_FILE}: field 'config.num_speakers' is {vocoder.config.num_speakers}; "
                         "chat speaks with a one-speaker vocoder (KE-Omni §5.1: one per agent speaker)")
    return vocoder.to(device).eval(), meta


def check_vocoder(path: str | Path, meta: Mapping[str, Any], units: Mapping[str, Any], source: str,
                  speaker: str | None) -> None:
    """Raise unless the vocoder at ``path`` speaks ``units`` (count, rate, fingerprint) of ``source`` and, when given,
    was trained for ``speaker``."""
    for name in ("num_units", "frame_rate", "units_fingerprint"):
        expect_field(path, meta, name, units[name], f"the units {source} uses")
    if speaker is not None:
        expect_field(path, meta, "speaker", speaker, f"the speaker {source} was trained for")


def check_flow_decoder(path: str | Path, meta: Mapping[str, Any], units: Mapping[str, Any], source: str) -> None:
    """Raise unless the flow decoder at ``path`` decodes the speech tokens of ``source`` (codebook size, token rate,
    and the tokenizer's fingerprint where the decoder records one: an imported released decoder may not)."""
    expect_field(path, meta, "codebook_size", units["num_units"], f"the speech tokens of {source}")
    expect_field(path, meta, "frame_rate_hz", float(units["frame_rate"]), f"the speech-token rate of {source}")
    if meta.get("units_fingerprint") is not None:
        expect_field(path, meta, "units_fingerprint", units["fingerprint"],
                     f"the fingerprint of {source}: the decoder was trained on another tokenizer's tokens")
