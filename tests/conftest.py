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


STAGE1_TINY = dict(d_model=64, n_head=4, ffn_dim=128, encoder_layers=2, vq_position=1, decoder_layers=1, codebook_size=16)


@pytest.fixture(scope="session")
def stage1_export(prepared, tmp_path_factory) -> Path:
    """A stage-1 export from a 4-step fit of a tiny tokenizer (VQ switched on at step 2)."""
    import lightning as L

    from datamodules.tokenizer import TokenizerDataModule
    from lit_keomni.checkpoints import Export
    from lit_keomni.stages.tokenizer import SpeechTokenizer

    tmp = tmp_path_factory.mktemp("stage1")
    L.seed_everything(3)
    model = SpeechTokenizer(config="tiny", overrides=STAGE1_TINY, tokenizer=str(prepared / "tokenizer.json"),
                            warmup_steps=2, vq_start=0.5, kmeans_batches=4, export_dir=str(tmp / "export"))
    data = TokenizerDataModule(data_dir=str(prepared), batch_size=4, num_workers=0)
    trainer = L.Trainer(accelerator="cpu", max_steps=4, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=1, callbacks=[Export()],
                        default_root_dir=str(tmp))
    trainer.fit(model, data)
    return tmp / "export"
