"""Stage 3 on tiny data and models: loss masks per source, packing, document masking, the 30 % text mixture,
learning + export round trip, exact resume."""

import json
import shutil
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from litdata import StreamingDataset

from datamodules.pretrain import (SOURCES, PretrainDataModule, document, mixture_weights, pack, pack_source,
                                  pretrain_collate)
from lit_keomni.checkpoints import AtomicCheckpointIO, Export, lm_tokenizer, load_lm
from lit_keomni.configs import TransformerConfig
from lit_keomni.nn.transformer import Transformer
from lit_keomni.stages.pretrain import Pretrain
from lit_keomni.text.templates import BEGIN_AUDIO, END_AUDIO

SEQ = 64
TINY_LM = {"n_layer": 2, "n_embd": 64, "n_head": 4, "n_kv_head": 2, "intermediate_size": 172, "block_size": SEQ}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread; with other work on the machine, two threads spin-wait on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class LossRecorder(L.Callback):
    def __init__(self, stop_at=None):
        self.losses, self.ids, self.stop_at = {}, {}, stop_at

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses[trainer.global_step] = float(outputs["loss"])
        self.ids[trainer.global_step] = batch["id"]
        if self.stop_at is not None and trainer.global_step >= self.stop_at:
            trainer.should_stop = True


@pytest.fixture(scope="module")
def data_args(prepared, stage1_export, speech_tokens, stage2_export, interleaved, tmp_path_factory):
    """Arguments of a PretrainDataModule over the tiny corpus whose rows have been packed once."""
    args = dict(speech_export=str(stage1_export), text_to_token_export=str(stage2_export),
                tokens_dir=str(speech_tokens), interleaved_dir=str(interleaved),
                packed_dir=str(tmp_path_factory.mktemp("packed")), data_dir=str(prepared), seq_len=SEQ,
                batch_size=4, num_workers=0)
    PretrainDataModule(**args).prepare_data()
    return args


def make(data_args, tmp_path, max_steps, callbacks, **kw):
    L.seed_everything(5)
    args = {"warmup_steps": 2, "lr": 3e-3, "export_dir": str(tmp_path / "export"), **kw}
    model = Pretrain(config="tiny", overrides=TINY_LM, speech_export=data_args["speech_export"], **args)
    data = PretrainDataModule(**data_args)
    trainer = L.Trainer(accelerator="cpu", max_steps=max_steps, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=1,
                        val_check_interval=max_steps, check_val_every_n_epoch=None, callbacks=callbacks,
                        default_root_dir=str(tmp_path), plugins=[AtomicCheckpointIO()])
    return model, data, trainer


def test_loss_mask_per_source(stage1_export):
    tok, _ = lm_tokenizer(stage1_export)
    boa, eoa = tok.token_to_id(BEGIN_AUDIO), tok.token_to_id(END_AUDIO)
    text, codes = "Sam has two cats.", np.array([3, 1, 4, 1], dtype=np.int32)
    item = {"text": text, "codes": codes, "tokens": np.array([*tok.encode("Sam"), boa, *tok.speech_to_ids([5]), eoa])}
    words, speech = tok.encode(text), tok.speech_to_ids(codes.tolist())

    ids, mask = document("asr", tok, item)
    assert ids == [boa, *speech, eoa, *words, tok.eos_id]
    assert [i for i, m in zip(ids, mask) if m] == [*words, tok.eos_id]
    ids, mask = document("tts", tok, item)
    assert ids == [*words, boa, *speech, eoa] and [i for i, m in zip(ids, mask) if m] == [*speech, eoa]
    for source, expect in (("text", [*words, tok.eos_id]), ("speech", [boa, *speech, eoa]),
                           ("interleaved", [*item["tokens"].tolist(), tok.eos_id])):
        ids, mask = document(source, tok, item)
        assert ids == expect and all(mask), source

    # Packed and collated: an ASR row trains exactly the transcripts and <|eos|>, a TTS row exactly the speech + end.
    for source, trained in (("asr", [*words, tok.eos_id]), ("tts", [*speech, eoa])):
        batch = pretrain_collate(pack_source(source, [item] * 3, tok, SEQ))
        target = batch["target"][0]
        assert target[target != -100].tolist() == trained * 3, source
        assert batch["source"].tolist() == [SOURCES.index(source)]


def test_packing_keeps_every_token_once():
    rng = np.random.default_rng(0)
    docs = [(rng.integers(10, 100, n).tolist(), (rng.random(n) < 0.7).tolist()) for n in (3, 40, 17, 1, 90, 5, 16)]
    rows = list(pack(docs, 17, pad_id=0))
    assert all(len(r["tokens"]) == len(r["document"]) == len(r["mask"]) == 17 for r in rows)
    stream = np.concatenate([r["tokens"][r["document"] >= 0] for r in rows]).tolist()
    assert stream == [t for ids, _ in docs for t in ids]  # in order: none lost, none duplicated
    assert len(rows) == -(-sum(len(i) for i, _ in docs) // 17) and all((r["document"] >= 0).all() for r in rows[:-1])
    for r in rows:
        real = r["document"][r["document"] >= 0]
        assert real[0] == 0 and (np.diff(real) >= 0).all() and (np.diff(real) <= 1).all()  # restart per row
        starts = np.flatnonzero(np.diff(r["document"], prepend=-2) != 0)
        assert not r["mask"][starts].any() and not r["mask"][r["document"] < 0].any()
    # The trained flags are the documents' own, except on the first token of each document and of each row.
    trained = np.concatenate([r["mask"][r["document"] >= 0] for r in rows]).astype(bool)
    expected = np.array([m for _, ms in docs for m in ms])
    expected[np.cumsum([0] + [len(i) for i, _ in docs[:-1]])] = False
    expected[::17] = False
    assert (trained == expected).all()


def test_packed_sources_on_disk(data_args):
    packed = Path(data_args["packed_dir"])
    stats = json.loads((packed / "packed.json").read_text())
    speech = StreamingDataset(f"{data_args['tokens_dir']}/chunks/train")
    assert stats["sources"]["speech"]["train"]["tokens"] == sum(len(speech[i]["codes"]) + 2 for i in range(len(speech)))
    inter = StreamingDataset(f"{data_args['interleaved_dir']}/chunks")
    n_inter = sum(stats["sources"]["interleaved"][s]["documents"] for s in ("train", "val"))
    assert n_inter == len(inter) == 24 and stats["sources"]["interleaved"]["val"]["documents"] >= 1
    assert stats["sources"]["interleaved"]["train"]["tokens"] + stats["sources"]["interleaved"]["val"]["tokens"] == \
        sum(len(inter[i]["tokens"]) + 1 for i in range(len(inter)))
    for source in SOURCES:
        for split in ("train", "val"):
            ds = StreamingDataset(str(packed / source / "chunks" / split))
            assert len(ds) == stats["sources"][source][split]["rows"] > 0
            row = ds[0]
            assert len(row["tokens"]) == SEQ + 1 and row["source"] == SOURCES.index(source)


def test_repacks_only_the_source_whose_input_changed(data_args, tmp_path):
    args = {**data_args, "interleaved_dir": str(tmp_path / "interleaved"), "packed_dir": str(tmp_path / "packed")}
    shutil.copytree(data_args["interleaved_dir"], args["interleaved_dir"])
    shutil.copytree(data_args["packed_dir"], args["packed_dir"])
    index = {s: Path(args["packed_dir"]) / s / "chunks" / "train" / "index.json" for s in SOURCES}
    before = {s: p.stat().st_mtime_ns for s, p in index.items()}
    PretrainDataModule(**args).prepare_data()
    assert {s: p.stat().st_mtime_ns for s, p in index.items()} == before  # same inputs: nothing re-packed
    stats = Path(args["interleaved_dir"]) / "stats.json"
    stats.write_text(stats.read_text().replace("{", '{"rerun": 1, ', 1))  # as if `interleave` ran again
    PretrainDataModule(**args).prepare_data()
    after = {s: p.stat().st_mtime_ns for s, p in index.items()}
    assert [s for s in SOURCES if after[s] != before[s]] == ["interleaved"]


def test_document_masking_equals_separate_documents():
    torch.manual_seed(0)
    model = Transformer(TransformerConfig.from_name("tiny", **TINY_LM)).eval()
    docs = [(list(range(5, 5 + n)), [True] * n) for n in (11, 23, 7, 9)]  # 50 tokens: one row of 65, padded
    row = next(pack(docs, SEQ + 1, pad_id=0))
    batch = pretrain_collate([{**row, "source": 0, "row": 0}])
    with torch.no_grad():
        packed = model(batch["input"], document_ids=batch["document_ids"])[0]
        start = 0
        for ids, _ in docs:
            alone = model(torch.tensor([ids]))[0]
            torch.testing.assert_close(packed[start: start + len(ids)], alone, rtol=1e-5, atol=1e-5)
            start += len(ids)
        # without document ids the later documents do attend to the earlier ones
        assert not torch.allclose(model(batch["input"])[0][11:34], packed[11:34], atol=1e-3)


def test_mixture_holds_text_at_30_percent(data_args):
    w = mixture_weights(0.3, None)
    assert w == pytest.approx({"text": 0.3, "interleaved": 0.3, "speech": 0.1, "asr": 0.15, "tts": 0.15})
    assert mixture_weights(0.3, {"interleaved": 1.0, "speech": 1.0}) == pytest.approx(
        {"text": 0.3, "interleaved": 0.35, "speech": 0.35, "asr": 0.0, "tts": 0.0})
    with pytest.raises(ValueError, match="'mixture'.*bogus"):
        mixture_weights(0.3, {"bogus": 1.0})
    with pytest.raises(ValueError, match="'text_fraction'"):
        mixture_weights(1.5, None)

    dm = PretrainDataModule(**{**data_args, "batch_size": 8})
    dm.setup("fit")
    loader = dm.train_dataloader()
    by_epoch: list[list[int]] = []
    while sum(map(len, by_epoch)) < 600:  # an epoch ends when the smallest source runs out
        by_epoch.append([s for batch in loader for s in batch["source"].tolist()])
        assert len(by_epoch) < 50
    assert by_epoch[0][:40] != by_epoch[1][:40]  # each epoch draws a new sequence of sources
    batch = next(iter(loader))
    assert batch["input"].shape == batch["document_ids"].shape == batch["target"].shape == (8, SEQ)
    sources = [s for e in by_epoch for s in e]
    counts = np.bincount(sources, minlength=len(SOURCES)) / len(sources)
    assert counts[SOURCES.index("text")] == pytest.approx(0.3, abs=0.05), counts
    for s, share in w.items():
        assert counts[SOURCES.index(s)] == pytest.approx(share, abs=0.06), (s, counts)


def test_learns_exports_and_reloads(data_args, tmp_path):
    rec = LossRecorder()
    model, data, trainer = make(data_args, tmp_path, 60, [rec, Export()])
    trainer.fit(model, data)
    assert trainer.current_epoch >= 1  # crossed an epoch end (a source ran out) and went on
    first, last = np.mean([rec.losses[s] for s in (1, 2, 3)]), np.mean([rec.losses[s] for s in range(56, 61)])
    assert last < 0.65 * first, (first, last)
    metrics = trainer.callback_metrics
    for key in ("train/loss_text", "train/loss_asr", "mix/text_share", "mix/speech_epochs", "val/loss",
                "val/loss_text", "val/loss_interleaved", "val/loss_speech", "val/loss_asr", "val/loss_tts"):
        assert key in metrics, key
    assert float(metrics["mix/text_share"]) == pytest.approx(0.3, abs=0.12)
    assert int(model.seen_rows.sum()) == sum(len(ids) for ids in rec.ids.values())

    loaded, tok, meta = load_lm(tmp_path / "export", "speech_lm")
    assert meta["stage"] == "pretrain" and meta["speech_tokenizer"]["codebook_size"] == 16 and tok.num_audio_tokens == 16
    batch = next(iter(data.val_dataloader()[0]))
    with torch.no_grad():
        torch.testing.assert_close(loaded(batch["input"], document_ids=batch["document_ids"]),
                                   model.model.cpu().eval()(batch["input"], document_ids=batch["document_ids"]))


def test_starts_from_an_lm_export(stage1_export, stage2_export):
    model = Pretrain(config="tiny", overrides=TINY_LM, speech_export=str(stage1_export), init_from=str(stage2_export))
    model.configure_model()
    reference, _, _ = load_lm(stage2_export, "text_to_token")
    assert model.model.config.block_size == SEQ  # the recipe's sequence length, the export's weights
    x = torch.randint(0, reference.config.vocab_size, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(model.model.eval()(x), reference(x))


def test_resume_gives_identical_next_losses(data_args, tmp_path):
    """Resume from a checkpoint after an epoch end (an epoch of the tiny mixture is at most 52 steps)."""
    full = LossRecorder()
    model, data, trainer = make(data_args, tmp_path / "a", 58, [full])
    trainer.fit(model, data)
    seen = model.seen_tokens.clone()

    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "b", save_last=True, save_top_k=0, every_n_train_steps=55)
    model, data, trainer = make(data_args, tmp_path / "b", 58, [LossRecorder(stop_at=55), ckpt])
    trainer.fit(model, data)
    assert trainer.current_epoch >= 1  # the checkpoint is past an epoch end
    resumed = LossRecorder()
    model, data, trainer = make(data_args, tmp_path / "c", 58, [resumed])
    trainer.fit(model, data, ckpt_path=str(tmp_path / "b" / "last.ckpt"))
    assert sorted(resumed.losses) == [56, 57, 58]
    assert [resumed.ids[s] for s in (56, 57, 58)] == [full.ids[s] for s in (56, 57, 58)]  # the same rows
    for step in (56, 57, 58):
        assert resumed.losses[step] == pytest.approx(full.losses[step], rel=1e-5), step
    assert torch.equal(model.seen_tokens, seen)  # the consumed-mixture counts survive the resume
