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


@pytest.fixture(scope="session")
def speech_tokens(prepared, stage1_export, tmp_path_factory) -> Path:
    """``tokenize`` of the prepared corpus with the tiny stage-1 export: chunks/{train,val} with codes, tokens.json."""
    from lit_keomni.speech_tokens import tokenize

    out = tmp_path_factory.mktemp("speech-tokens")
    tokenize(stage1_export, prepared, out)
    return out


STAGE2_TINY = {"n_layer": 2, "n_embd": 64, "n_head": 4, "n_kv_head": 2, "intermediate_size": 172, "block_size": 512}


@pytest.fixture(scope="session")
def stage2_export(prepared, stage1_export, speech_tokens, tmp_path_factory) -> Path:
    """A stage-2 (text-to-token) export from a 4-step fit of a tiny model."""
    import lightning as L

    from datamodules.text_to_token import TextToTokenDataModule
    from lit_keomni.checkpoints import Export
    from lit_keomni.stages.text_to_token import TextToToken

    tmp = tmp_path_factory.mktemp("stage2")
    L.seed_everything(5)
    model = TextToToken(config="tiny", overrides=STAGE2_TINY, speech_export=str(stage1_export), warmup_steps=2,
                        lr=3e-3, export_dir=str(tmp / "export"))
    data = TextToTokenDataModule(speech_export=str(stage1_export), tokens_dir=str(speech_tokens),
                                 data_dir=str(prepared), batch_size=4, num_workers=0)
    trainer = L.Trainer(accelerator="cpu", max_steps=4, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                        callbacks=[Export()], default_root_dir=str(tmp))
    trainer.fit(model, data)
    return tmp / "export"


@pytest.fixture(scope="session")
def interleaved(prepared, stage2_export, tmp_path_factory) -> Path:
    """``interleave`` of the first 24 toy-world text documents with the tiny stage-2 export: chunks/, stats.json."""
    from lit_keomni.interleave import interleave

    out = tmp_path_factory.mktemp("interleaved")
    interleave(str(stage2_export), str(prepared / "text" / "toy_world.jsonl"), str(out), limit=24, batch_size=128)
    return out
