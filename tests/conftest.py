"""Shared fixtures: a small prepared built-in corpus (espeak-ng speech) made once per test session."""

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session", autouse=True)
def _litdata_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("litdata-cache")
    os.environ["DATA_OPTIMIZER_CACHE_FOLDER"] = str(cache / "chunks")
    os.environ["DATA_OPTIMIZER_DATA_CACHE_FOLDER"] = str(cache / "data")


@pytest.fixture(scope="session")
def prepared(tmp_path_factory) -> Path:
    """``prepare`` on a 16-dialogue built-in corpus: chunks/{train,val}, tokenizer.json."""
    from datamodules.streaming import prepare

    out = tmp_path_factory.mktemp("prepared")
    prepare(out, num_dialogues=16, seed=7, workers=1, tokenizer_vocab=400, val_fraction=0.2, progress=False)
    return out
