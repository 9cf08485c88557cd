"""Stage 2 end to end on tiny models: tokenize-if-missing, learning, exact resume, export round trip, ASR judge."""

import lightning as L
import numpy as np
import pytest
import torch

from datamodules.text_to_token import TextToTokenDataModule
from lit_keomni.checkpoints import AtomicCheckpointIO, Export, lm_tokenizer, load_text_to_token
from lit_keomni.stages.text_to_token import TextToToken
from lit_keomni.text.templates import BEGIN_AUDIO, END_AUDIO, pad_batch, tts

TINY_LM = {"n_layer": 2, "n_embd": 64, "n_head": 4, "n_kv_head": 2, "intermediate_size": 172, "block_size": 512}


class LossRecorder(L.Callback):
    def __init__(self, stop_at=None):
        self.losses, self.stop_at = {}, stop_at

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses[trainer.global_step] = float(outputs["loss"])
        if self.stop_at is not None and trainer.global_step >= self.stop_at:
            trainer.should_stop = True


def make(prepared, stage1_export, tokens, tmp_path, max_steps, callbacks, **kw):
    L.seed_everything(5)
    args = {"warmup_steps": 2, "val_generate_batches": 1, "export_dir": str(tmp_path / "export"), **kw}
    model = TextToToken(config="tiny", overrides=TINY_LM, speech_export=str(stage1_export), **args)
    data = TextToTokenDataModule(speech_export=str(stage1_export), tokens_dir=str(tokens), data_dir=str(prepared),
                                 batch_size=4, num_workers=0)
    trainer = L.Trainer(accelerator="cpu", max_steps=max_steps, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=1,
                        val_check_interval=max_steps, check_val_every_n_epoch=None, callbacks=callbacks,
                        default_root_dir=str(tmp_path), plugins=[AtomicCheckpointIO()])
    return model, data, trainer


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    return tmp_path_factory.mktemp("tokens")


def test_tts_sequence_masks_only_speech(stage1_export):
    tok, meta = lm_tokenizer(stage1_export)
    ids, mask = tts(tok, "hello world", [3, 1, 4])
    text = tok.encode("hello world")
    assert ids[: len(text)] == text and ids[len(text)] == tok.token_to_id(BEGIN_AUDIO)
    assert ids[-1] == tok.token_to_id(END_AUDIO) and tok.ids_to_speech(ids[len(text) + 1 : -1]) == [3, 1, 4]
    assert mask == [False] * (len(text) + 1) + [True] * 4
    idx, target = pad_batch([(ids, mask)], tok.pad_id)
    trained = target[0] != -100
    assert trained.sum() == 4 and tok.ids_to_speech(target[0][trained][:-1].tolist()) == [3, 1, 4]


def test_resume_gives_identical_next_losses(prepared, stage1_export, tokens, tmp_path):
    full = LossRecorder()
    model, data, trainer = make(prepared, stage1_export, tokens, tmp_path / "a", 6, [full])
    trainer.fit(model, data)
    assert (tokens / "tokens.json").is_file()  # tokenize ran because the tokens were missing

    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "b", save_last=True, save_top_k=0, every_n_train_steps=3)
    model, data, trainer = make(prepared, stage1_export, tokens, tmp_path / "b", 6, [LossRecorder(stop_at=3), ckpt])
    trainer.fit(model, data)
    resumed = LossRecorder()
    model, data, trainer = make(prepared, stage1_export, tokens, tmp_path / "c", 6, [resumed])
    trainer.fit(model, data, ckpt_path=str(tmp_path / "b" / "last.ckpt"))
    assert sorted(resumed.losses) == [4, 5, 6]
    for step in (4, 5, 6):
        assert resumed.losses[step] == pytest.approx(full.losses[step], rel=1e-5), step


def test_learns_and_exports(prepared, stage1_export, tokens, tmp_path):
    rec = LossRecorder()
    model, data, trainer = make(prepared, stage1_export, tokens, tmp_path, 40, [rec, Export()], lr=3e-3)
    trainer.fit(model, data)
    first, last = np.mean([rec.losses[s] for s in (1, 2, 3)]), np.mean([rec.losses[s] for s in (38, 39, 40)])
    assert last < 0.8 * first, (first, last)
    assert "val/generated_cer" in trainer.callback_metrics or "val/generated_wer" in trainer.callback_metrics

    loaded, tok, meta = load_text_to_token(tmp_path / "export")
    assert meta["speech_tokenizer"]["codebook_size"] == 16 and tok.num_audio_tokens == 16
    x = torch.randint(0, tok.vocab_size, (2, 12))
    torch.testing.assert_close(loaded(x), model.model.cpu().eval()(x))
    speech = model.generate_speech(["Sam lives with a duck.", "小红是银湖城人。"])
    assert all(all(0 <= c < 16 for c in row) for row in speech)


def test_interleave_command_on_builtin_text(prepared, stage1_export, tokens, tmp_path):
    """`python -m lit_keomni interleave` with a stage-2 export over the built-in toy-world text."""
    from litdata import StreamingDataset

    from lit_keomni.cli import main

    model, data, trainer = make(prepared, stage1_export, tokens, tmp_path, 2, [Export()])
    trainer.fit(model, data)
    text = prepared / "text" / "toy_world.jsonl"
    assert text.is_file()
    out = tmp_path / "interleaved"
    main(["interleave", "--export", str(tmp_path / "export"), "--source", str(text), "--out", str(out),
          "--limit", "24", "--shard-size", "10", "--batch-size", "32"])
    ds = StreamingDataset(str(out / "chunks"))
    assert len(ds) == 24
    tok = model.text_tokenizer
    boa, eoa = tok.token_to_id(BEGIN_AUDIO), tok.token_to_id(END_AUDIO)
    item = ds[0]
    ids = item["tokens"].tolist()
    assert ids.count(boa) == ids.count(eoa) >= 1
    import json

    stats = json.loads((out / "stats.json").read_text())
    assert stats["documents"] == 24 and stats["speech_tokens"] > 0


def test_generation_stays_within_the_context(stage1_export):
    """Validation synthesis of long and short texts in one left-padded batch never asks for more positions than
    ``block_size``: a character vocabulary makes prompts long enough that prompt + speech budget would pass it."""
    L.seed_everything(1)
    model = TextToToken(config="tiny", overrides={**TINY_LM, "block_size": 64}, speech_export=str(stage1_export))
    model.configure_model()
    texts = ["Sam lives with a duck and a cat and a dog in the old green house.", "Hi."]
    assert max(len(tts(model.text_tokenizer, t, None)[0]) for t in texts) > 20
    speech = model.generate_speech(texts)
    longest = max(len(tts(model.text_tokenizer, t, None)[0]) for t in texts)
    assert len(speech) == 2 and all(len(row) <= 64 - longest for row in speech)
