"""Stage 7 (unit HiFi-GAN vocoder) on tiny models: output length and upsampling rates, streaming = full synthesis,
discriminator/generator step alternation, export round trip, exact resume, speaker errors, the paper recipe."""

from pathlib import Path

import lightning as L
import pytest
import torch

from datamodules.vocoder import VocoderDataModule
from lit_keomni.checkpoints import AtomicCheckpointIO, Export, load_vocoder, unit_meta
from lit_keomni.nn.hifigan import UnitVocoder, VocoderConfig, factor_hop
from lit_keomni.nn.vocos import UnitVocos
from lit_keomni.stages.vocoder import Vocoder

TEST_SIZES = {"unit_dim": 16, "upsample_initial_channel": 32, "mpd_channels": (4, 4, 8, 8, 8),
              "msd_channels": (4, 4, 8, 8, 8, 8, 8)}
VOCOS_SIZES = {"unit_dim": 16, "vocos_dim": 32, "vocos_intermediate_dim": 64, "vocos_layers": 2,
               "mpd_channels": (4, 4, 8, 8, 8), "msd_channels": (4, 4, 8, 8, 8, 8, 8)}
ROOT = Path(__file__).resolve().parent.parent


class Snapshots(L.Callback):
    """Generator / discriminator parameters at batch start, before each optimiser step and at batch end."""

    def __init__(self):
        self.marks, self.optimizers, self.losses = [], [], {}

    def _take(self, m):
        g = torch.cat([p.detach().flatten().clone() for p in m.generator.parameters()])
        d = torch.cat([p.detach().flatten().clone() for p in [*m.mpd.parameters(), *m.msd.parameters()]])
        self.marks.append((g, d))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._take(pl_module)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self._take(pl_module)
        self.optimizers.append(optimizer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._take(pl_module)
        self.losses[trainer.global_step] = (float(outputs["loss"]), float(outputs["loss_d"]))


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("vocoder-pairs")


def make(prepared, stage1_export, tokens, pairs, tmp_path, max_steps, callbacks, speaker="agentFemale", config="tiny",
         overrides=TEST_SIZES, **kw):
    L.seed_everything(5)
    model = Vocoder(config=config, overrides=overrides, units_from=str(stage1_export), lr=1e-3,
                    export_dir=str(tmp_path / "export"), **kw)
    data = VocoderDataModule(units_from=str(stage1_export), tokens_dir=str(tokens), speaker=speaker, out_dir=str(pairs),
                             segment_units=3, val_max_units=12, data_dir=str(prepared), batch_size=2, num_workers=0)
    trainer = L.Trainer(accelerator="cpu", max_steps=max_steps, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=1,
                        val_check_interval=max(1, max_steps // 2), check_val_every_n_epoch=None, callbacks=callbacks,
                        default_root_dir=str(tmp_path), plugins=[AtomicCheckpointIO()])
    return model, data, trainer


def test_generator_length_and_upsample_rates():
    assert factor_hop(1280, 4) == (8, 8, 5, 4) and factor_hop(320, 4) == (5, 4, 4, 4)
    for name in ("tiny", "v1"):
        c = VocoderConfig.from_name(name)
        assert c.hop == 1280 and c.upsample_rates == (8, 8, 5, 4)
    c = VocoderConfig.from_name("tiny", **TEST_SIZES, sample_rate=16000, frame_rate=50.0)
    assert c.hop == 320 and c.upsample_rates == (5, 4, 4, 4)
    torch.manual_seed(0)
    vocoder = UnitVocoder(16, VocoderConfig.from_name("tiny", **TEST_SIZES))
    wav = vocoder(torch.randint(0, 16, (2, 7)))
    assert wav.shape == (2, 7 * 1280) and wav.abs().max() <= 1
    with pytest.raises(ValueError, match="frame_rate"):
        VocoderConfig(sample_rate=16000, frame_rate=12.3)
    with pytest.raises(ValueError, match="does not factor"):
        VocoderConfig(sample_rate=12830, frame_rate=10.0)  # hop 1283 is prime
    with pytest.raises(ValueError, match="upsample_rates"):
        VocoderConfig(upsample_rates=(8, 8, 4, 4))


def test_streaming_equals_full_synthesis():
    torch.manual_seed(0)
    vocoder = UnitVocoder(16, VocoderConfig.from_name("tiny", **TEST_SIZES)).eval()
    units = torch.randint(0, 16, (41,))
    with torch.no_grad():
        full = vocoder(units[None])[0]
    chunks = list(vocoder.stream(units, chunk=6))
    assert [len(c) for c in chunks] == [6 * 1280] * 6 + [5 * 1280]
    assert full.abs().max() > 1e-2
    torch.testing.assert_close(torch.cat(chunks), full, atol=1e-6, rtol=1e-4)
    seams = (torch.cat(list(vocoder.stream(units, chunk=6, context=0))) - full).abs().max()
    assert seams > 1e-3 and seams > 100 * (torch.cat(chunks) - full).abs().max()  # the context makes them exact


def test_discriminator_then_generator_step(prepared, stage1_export, speech_tokens, pairs_dir, tmp_path):
    snap = Snapshots()
    model, data, trainer = make(prepared, stage1_export, speech_tokens, pairs_dir, tmp_path, 2, [snap])
    trainer.fit(model, data)
    opt_g, opt_d = (o.optimizer for o in model.optimizers())
    assert snap.optimizers == [opt_d, opt_g]  # discriminator first
    (g0, d0), (g1, d1), (g2, d2), (g3, d3) = snap.marks
    assert torch.equal(g0, g1) and torch.equal(d0, d1)  # nothing moves before the first step
    assert not torch.equal(d1, d2) and torch.equal(g1, g2)  # D step: discriminators only
    assert not torch.equal(g2, g3) and torch.equal(d2, d3)  # G step: generator only
    assert trainer.global_step == 2  # Lightning counts both optimiser steps


def test_pairs_fit_export_round_trip(prepared, stage1_export, speech_tokens, pairs_dir, tmp_path):
    model, data, trainer = make(prepared, stage1_export, speech_tokens, pairs_dir, tmp_path, 6, [Export()])
    trainer.fit(model, data)
    batch = next(iter(data.train_dataloader()))
    assert batch["units"].shape == (2, 3) and batch["audio"].shape == (2, 3 * 1280)
    assert (pairs_dir / "agentFemale" / "vocoder.json").is_file()
    assert "val/mel_l1" in trainer.callback_metrics

    loaded, meta = load_vocoder(tmp_path / "export")
    assert (meta["speaker"], meta["num_units"], meta["sample_rate"], meta["frame_rate"]) == ("agentFemale", 16, 16000, 12.5)
    assert meta["units_fingerprint"] == unit_meta(stage1_export)["fingerprint"]
    units = torch.randint(0, 16, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(units), model.generator.cpu().eval()(units), atol=1e-5, rtol=1e-4)


def test_resume_gives_identical_next_losses(prepared, stage1_export, speech_tokens, pairs_dir, tmp_path):
    full = Snapshots()
    model, data, trainer = make(prepared, stage1_export, speech_tokens, pairs_dir, tmp_path / "a", 8, [full])
    trainer.fit(model, data)

    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "b", save_last=True, save_top_k=0, every_n_train_steps=4)
    model, data, trainer = make(prepared, stage1_export, speech_tokens, pairs_dir, tmp_path / "b", 4, [ckpt])
    trainer.fit(model, data)
    resumed = Snapshots()
    model, data, trainer = make(prepared, stage1_export, speech_tokens, pairs_dir, tmp_path / "c", 8, [resumed])
    trainer.fit(model, data, ckpt_path=str(tmp_path / "b" / "last.ckpt"))
    assert sorted(resumed.losses) == [6, 8]
    for step in (6, 8):
        assert resumed.losses[step] == pytest.approx(full.losses[step], rel=1e-5), step


def test_unknown_speaker_is_one_clear_error(prepared, stage1_export, speech_tokens, tmp_path):
    data = VocoderDataModule(units_from=str(stage1_export), tokens_dir=str(speech_tokens), speaker="agentNobody",
                             out_dir=str(tmp_path), data_dir=str(prepared))
    with pytest.raises(ValueError, match=r"field 'speaker' == 'agentNobody'.*\['agentFemale', 'agentMale'\]"):
        data.prepare_data()


def test_recipes_stage7(capsys, monkeypatch):
    from tests.test_paper_recipes import n_params, printed

    tiny = printed(ROOT / "recipes" / "stage7.yaml", capsys, monkeypatch)
    assert tiny["data"]["init_args"]["speaker"] == "agentFemale" and tiny["model"]["init_args"]["config"] == "tiny"
    cfg = printed(ROOT / "recipes" / "paper" / "stage7.yaml", capsys, monkeypatch)
    m, d, t = cfg["model"]["init_args"], cfg["data"]["init_args"], cfg["trainer"]
    assert (m["config"], m["lr"], tuple(m["betas"]), m["lr_decay"], m["mel_weight"]) == ("v1", 2e-4, (0.8, 0.99), 0.999, 45.0)
    assert t["accelerator"] == "cuda" and d["batch_size"] * t["devices"] * t["num_nodes"] == 16
    c = VocoderConfig.from_name(m["config"], **(m["overrides"] or {}))
    assert 7000 <= d["segment_units"] * c.hop <= 9000  # HiFi-GAN's 8192-sample segments
    assert (c.upsample_initial_channel, c.resblock_kernel_sizes, c.resblock_dilation_sizes) == (
        512, (3, 7, 11), ((1, 3, 5),) * 3)
    with torch.device("meta"):
        vocoder = UnitVocoder(4000, c)  # KE-Omni §5.1: 4,000 k-means units
    # HiFi-GAN V1's generator has 13.9 M parameters (rates 8, 8, 2, 2); ours reach the 1280 hop with 8, 8, 5, 4
    assert 13e6 < n_params(vocoder) - 4000 * c.unit_dim < 15e6


def test_unit_vocos_length_streaming_and_receptive_field():
    """The Vocos generator behind the unit embedding: F units -> F·hop samples in [-1, 1]; streamed chunks with
    ``receptive_units`` of context equal the whole synthesis, and less context than that changes the seams."""
    torch.manual_seed(0)
    c = VocoderConfig.from_name("vocos-tiny", **VOCOS_SIZES)
    vocoder = UnitVocos(16, c).eval()
    assert vocoder.frames_per_unit == 5 and vocoder.receptive_units == 4  # (3 · 3 + 2) = 11 frames -> 3 units, + 1
    for p in vocoder.parameters():  # a random generator whose output reaches well past the clamp's floor
        p.data.normal_(0, 0.3)
    units = torch.randint(0, 16, (41,))
    with torch.no_grad():
        full = vocoder(units[None])[0]
    assert full.shape == (41 * 1280,) and full.abs().max() <= 1 and full.abs().max() > 1e-2
    chunks = list(vocoder.stream(units, chunk=6))
    assert [len(x) for x in chunks] == [6 * 1280] * 6 + [5 * 1280]
    torch.testing.assert_close(torch.cat(chunks), full, atol=1e-5, rtol=1e-4)
    short = (torch.cat(list(vocoder.stream(units, chunk=6, context=1))) - full).abs().max()
    assert short > 1e-3 and short > 100 * (torch.cat(chunks) - full).abs().max()
    with pytest.raises(ValueError, match="field 'generator' is 'wavenet'"):
        VocoderConfig(generator="wavenet")
    with pytest.raises(ValueError, match="'istft_hop' 300 must divide the unit hop 1280"):
        VocoderConfig.from_name("vocos-tiny", istft_hop=300)


def test_unit_vocos_fit_export_round_trip(prepared, stage1_export, speech_tokens, pairs_dir, tmp_path):
    """The stage trains the Vocos generator like HiFi-GAN's (D step, then G step) and its export loads back as a
    ``UnitVocos`` with the same output."""
    snap = Snapshots()
    model, data, trainer = make(prepared, stage1_export, speech_tokens, pairs_dir, tmp_path, 4, [snap, Export()],
                                config="vocos-tiny", overrides=VOCOS_SIZES)
    trainer.fit(model, data)
    assert isinstance(model.generator, UnitVocos) and "val/mel_l1" in trainer.callback_metrics
    (g0, _), (g1, _), (g2, _), (g3, _) = snap.marks[:4]
    assert torch.equal(g1, g2) and not torch.equal(g2, g3)  # the generator moves in its own step only
    loaded, meta = load_vocoder(tmp_path / "export")
    assert isinstance(loaded, UnitVocos) and meta["speaker"] == "agentFemale"
    units = torch.randint(0, 16, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(units), model.generator.cpu().eval()(units), atol=1e-5, rtol=1e-4)


def test_recipe_stage7_unit_vocos(capsys, monkeypatch):
    from tests.test_paper_recipes import printed

    cfg = printed(ROOT / "recipes" / "stage7_unit_vocos.yaml", capsys, monkeypatch)
    m, d = cfg["model"]["init_args"], cfg["data"]["init_args"]
    assert m["config"] == "vocos-tiny" and d["speaker"] == "agentFemale"
    assert VocoderConfig.from_name(m["config"]).generator == "vocos"


def test_chat_unit_stream_speaks_through_the_unit_vocos():
    """``chat``'s incremental vocoding (units arriving in pieces) with the Vocos generator: with a look-ahead of its
    receptive field the streamed audio equals one synthesis of all units."""
    from lit_keomni.chat.streaming import UnitStream

    torch.manual_seed(0)
    vocoder = UnitVocos(16, VocoderConfig.from_name("vocos-tiny", **VOCOS_SIZES)).eval()
    for p in vocoder.parameters():
        p.data.normal_(0, 0.3)
    units = torch.randint(0, 16, (30,)).tolist()
    stream = UnitStream(vocoder, block=4, lookahead=vocoder.receptive_units)
    for i in range(0, 30, 7):
        stream.push(units[i: i + 7])
    stream.flush()
    with torch.no_grad():
        torch.testing.assert_close(stream.audio(), vocoder(torch.tensor([units]))[0], atol=1e-5, rtol=1e-4)
