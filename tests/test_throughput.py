"""Throughput in every fit: tokens/s, samples/s (LM stages), audio seconds/s (speech tokenizer)."""

import lightning as L

from lit_keomni.training import TokenThroughput
from tests.test_stage4 import make


def test_lm_stage_logs_tokens_and_samples_per_second(prepared, stage1_export, tmp_path):
    model, data, trainer = make("discrete", prepared, stage1_export, tmp_path / "work", tmp_path, 2,
                                [TokenThroughput()])
    trainer.fit(model, data)
    m = trainer.callback_metrics
    assert float(m["perf/tokens_per_s"]) > float(m["perf/samples_per_s"]) > 0
    assert "perf/audio_s_per_s" not in m and "perf/mfu" not in m  # no audio in the batch; MFU on CUDA only


def test_speech_tokenizer_logs_audio_seconds_per_second(prepared, tmp_path):
    from datamodules.tokenizer import TokenizerDataModule
    from lit_keomni.stages.tokenizer import SpeechTokenizer
    from tests.conftest import STAGE1_TINY

    L.seed_everything(0)
    model = SpeechTokenizer(config="tiny", overrides=STAGE1_TINY, tokenizer=str(prepared / "tokenizer.json"),
                            warmup_steps=1, export_dir=None)
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                        callbacks=[TokenThroughput()], default_root_dir=str(tmp_path))
    trainer.fit(model, TokenizerDataModule(data_dir=str(prepared), batch_size=2, num_workers=0))
    m = trainer.callback_metrics
    assert float(m["perf/audio_s_per_s"]) > 0 and float(m["perf/samples_per_s"]) > 0
