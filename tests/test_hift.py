"""HiFT mel vocoder (``nn/hift.py``, stage 7 ``stages/mel_vocoder.py``): parity with GLM-4-Voice's reference
``HiFTGenerator`` through golden files (tests/golden/make_glm4voice_hift.py), the released ``hift.pt`` form and its
errors, iSTFT head shapes, the mel front end and F0 track, and the training stage on tiny data: steps, exact resume,
export round trip, the recipe."""

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from safetensors.torch import load_file

from datamodules.mel_vocoder import MelVocoderDataModule
from lit_keomni.checkpoints import AtomicCheckpointIO, Export, load_mel_vocoder
from lit_keomni.nn.hift import (
    HiFTConfig,
    HiFTGenerator,
    MelFrontEnd,
    f0_track,
    from_released,
    hift_state_to_released,
    load_released_hift,
)
from lit_keomni.stages.mel_vocoder import MelVocoder

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "tests" / "golden"
TEST_SIZES = {"base_channels": 16, "f0_channels": 16, "resblock_kernel_sizes": (3,), "resblock_dilation_sizes": ((1, 3),),
              "source_resblock_dilation_sizes": ((1,), (1,)), "mpd_channels": (4, 4, 8, 8, 8), "mrd_channels": 4,
              "mrd_resolutions": ((512, 50, 240), (256, 32, 128))}


@pytest.fixture(scope="module")
def golden():
    meta = json.loads((GOLDEN / "glm4voice_hift.json").read_text())
    tensors = load_file(str(GOLDEN / "glm4voice_hift.safetensors"))
    return meta, tensors


@pytest.fixture
def released_pt(golden, tmp_path):
    """The golden reference model's state dict saved as the released ``hift.pt`` is (weight_g / weight_v)."""
    _, t = golden
    path = tmp_path / "hift.pt"
    torch.save({k.removeprefix("hift."): v for k, v in t.items() if k.startswith("hift.")}, path)
    return path


def _seeded(meta, name):
    return torch.Generator().manual_seed(meta["seeds"][name])


# ------------------------------------------------------------------------------------------------ parity


def test_released_config_section():
    c = from_released(json.loads((GOLDEN / "glm4voice_hift.json").read_text())["hift"])
    assert (c.base_channels, c.f0_channels, c.hop, c.istft_n_fft, c.istft_hop) == (16, 16, 256, 16, 4)
    full = HiFTConfig.from_name("glm-4-voice-decoder")
    # glm-4-voice-decoder/config.yaml's hift section, as a plain dict
    section = {"_class": "cosyvoice.hifigan.generator.HiFTGenerator", "in_channels": 80, "base_channels": 512,
               "nb_harmonics": 8, "sampling_rate": 22050, "nsf_alpha": 0.1, "nsf_sigma": 0.003,
               "nsf_voiced_threshold": 10, "upsample_rates": [8, 8], "upsample_kernel_sizes": [16, 16],
               "istft_params": {"n_fft": 16, "hop_len": 4}, "resblock_kernel_sizes": [3, 7, 11],
               "resblock_dilation_sizes": [[1, 3, 5]] * 3, "source_resblock_kernel_sizes": [7, 11],
               "source_resblock_dilation_sizes": [[1, 3, 5]] * 2, "lrelu_slope": 0.1, "audio_limit": 0.99,
               "f0_predictor": {"_class": "cosyvoice.hifigan.f0_predictor.ConvRNNF0Predictor", "num_class": 1,
                                "in_channels": 80, "cond_channels": 512}}
    assert from_released(section) == full
    with torch.device("meta"):
        n = sum(p.numel() for p in HiFTGenerator(full).parameters())
    assert 20e6 < n < 21.5e6  # the released hift.pt holds 20.8 M parameters


def test_golden_parity(golden, released_pt):
    """Every output of the reference, its random excitation included: the golden script seeds torch's global
    generator before each call, and a generator seeded alike draws the same phases and noise here."""
    meta, t = golden
    model = load_released_hift(released_pt, from_released(meta["hift"], str(GOLDEN / "glm4voice_hift.json")))
    tol = dict(atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        f0 = model.f0_predictor(t["mel"])
        torch.testing.assert_close(f0, t["f0"], **tol)
        torch.testing.assert_close(model.f0_to_source(t["f0"], _seeded(meta, "seed_source")), t["source"], **tol)
        wav, f0_out = model(t["mel"], generator=_seeded(meta, "seed_forward"))
        torch.testing.assert_close(wav, t["wav"], **tol)
        torch.testing.assert_close(model.f0_to_source(f0_out, _seeded(meta, "seed_forward")), t["wav_source"], **tol)
    assert t["wav"].std() > 0.02 and 0.2 < float((t["f0"] > 10).float().mean()) < 1.0  # not a trivial waveform
    wav_1, source_1 = model.inference(t["stream_mel_1"], generator=_seeded(meta, "seed_stream_1"))
    torch.testing.assert_close(wav_1, t["stream_wav_1"], **tol)
    torch.testing.assert_close(source_1, t["stream_source_1"], **tol)
    torch.testing.assert_close(source_1[:, :, -256:], t["stream_cache"], **tol)
    wav_2, source_2 = model.inference(t["stream_mel_2"], cache_source=t["stream_cache"],
                                      generator=_seeded(meta, "seed_stream_2"))
    torch.testing.assert_close(wav_2, t["stream_wav_2"], **tol)
    torch.testing.assert_close(source_2, t["stream_source_2"], **tol)
    assert torch.equal(source_2[:, :, :256], t["stream_cache"])  # the cache replaces the first excitation samples
    # folding weight norm leaves the output as it is
    folded, _ = model.remove_weight_norm().inference(t["stream_mel_1"], generator=_seeded(meta, "seed_stream_1"))
    torch.testing.assert_close(folded, t["stream_wav_1"], atol=1e-4, rtol=1e-4)


def test_released_round_trip(golden, released_pt, tmp_path):
    meta, t = golden
    config = from_released(meta["hift"])
    model = load_released_hift(released_pt, config)
    state = hift_state_to_released(model)
    assert set(state) == {k.removeprefix("hift.") for k in t if k.startswith("hift.")}
    for k, v in state.items():
        assert torch.equal(v, t[f"hift.{k}"]), k
    # a file written with weight norm folded into plain weights loads to the same function
    folded = tmp_path / "folded.pt"
    torch.save(load_released_hift(released_pt, config).remove_weight_norm().state_dict(), folded)
    again = load_released_hift(folded, config)
    with torch.no_grad():
        a = model(t["mel"], generator=torch.Generator().manual_seed(1))[0]
        b = again(t["mel"], generator=torch.Generator().manual_seed(1))[0]
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)  # g and v recomputed from w: float rounding only
    assert set(hift_state_to_released(again.remove_weight_norm())) == set(state)


def test_released_bad_inputs(golden, released_pt, tmp_path):
    meta, t = golden
    config = from_released(meta["hift"])
    state = torch.load(released_pt, weights_only=True)
    cases = {
        "missing": ({k: v for k, v in state.items() if k != "conv_post.weight_g"}, r"missing keys \['conv_post.weight_g'\]"),
        "unexpected": ({**state, "extra.weight": torch.zeros(1)}, r"unexpected keys \['extra.weight'\]"),
        "shape": ({**state, "m_source.l_linear.weight": torch.zeros(1, 5)}, r"m_source.l_linear.weight: \(1, 5\) in file"),
    }
    for name, (bad, pattern) in cases.items():
        path = tmp_path / f"{name}.pt"
        torch.save(bad, path)
        with pytest.raises(ValueError, match=rf"{name}\.pt: weights do not fit .*{pattern}"):
            load_released_hift(path, config)
    with pytest.raises(ValueError, match="shape mismatch"):
        load_released_hift(released_pt, config.replace(base_channels=32))
    with pytest.raises(FileNotFoundError, match="nothing.pt"):
        load_released_hift(tmp_path / "nothing.pt", config)
    (tmp_path / "broken.pt").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="broken.pt: cannot read"):
        load_released_hift(tmp_path / "broken.pt", config)

    section = meta["hift"]
    for change, pattern in [
        ({"_class": "cosyvoice.hifigan.generator.CausalHiFTGenerator"}, r"decoder/config.yaml: field 'hift._class'"),
        ({"f0_predictor": {**section["f0_predictor"], "_class": "CausalConvRNNF0Predictor"}}, r"'hift.f0_predictor._class'"),
        ({"f0_predictor": {**section["f0_predictor"], "num_class": 2}}, r"'hift.f0_predictor.num_class' is 2"),
        ({"conv_pre_look_right": 4}, r"'hift.conv_pre_look_right' is not a HiFTGenerator option"),
        ({"istft_params": {"n_fft": 16, "hop_len": 4, "center": False}}, r"'hift.istft_params'"),
        ({"sampling_rate": "<sample_rate>"}, r"'hift.sampling_rate' is the string"),
        ({"upsample_kernel_sizes": [16]}, r"decoder/config.yaml: the 'hift' section .*upsample_kernel_sizes"),
    ]:
        with pytest.raises(ValueError, match=pattern):
            from_released({**section, **change}, "glm-4-voice-decoder/config.yaml")


def test_istft_head_shapes():
    torch.manual_seed(0)
    for sizes in ({}, {"upsample_rates": (8, 4, 2), "upsample_kernel_sizes": (16, 8, 4),
                       "source_resblock_kernel_sizes": (7, 7, 11), "source_resblock_dilation_sizes": ((1,),) * 3}):
        c = HiFTConfig.from_name("tiny", **{**TEST_SIZES, **sizes})
        assert c.hop == 256
        model = HiFTGenerator(c).eval()
        for frames in (1, 7, 20):
            wav, f0 = model(torch.randn(2, 80, frames))
            assert wav.shape == (2, frames * c.hop) and f0.shape == (2, frames)
            assert wav.abs().max() <= c.audio_limit
    model = HiFTGenerator(HiFTConfig.from_name("tiny", **TEST_SIZES, istft_hop=2, mel_n_fft=512))
    assert model.hop == 128 and model(torch.randn(1, 80, 5))[0].shape == (1, 640)
    with pytest.raises(ValueError, match=r"mel must be \(B, 80, T\)"):
        model(torch.randn(80, 5))
    with pytest.raises(ValueError, match="cache_source"):
        model.inference(torch.randn(1, 80, 2), cache_source=torch.zeros(1, 1, 1000))
    with pytest.raises(ValueError, match="base_channels"):
        HiFTConfig(base_channels=30)


def test_mel_front_end_and_f0_track():
    mel = MelFrontEnd()
    assert mel.settings() == {"sample_rate": 22050, "n_fft": 1024, "win_length": 1024, "hop_length": 256, "n_mels": 80,
                              "f_min": 0.0, "f_max": 8000.0, "log": "ln(max(mel, 1e-5))", "center": False}
    t = torch.arange(22050 * 2) / 22050
    tone = 0.5 * torch.sin(2 * torch.pi * 220.0 * t)
    wav = torch.stack([tone, torch.zeros_like(tone)])[:, : 256 * 100]
    m = mel(wav)
    assert m.shape == (2, 80, 100)
    assert m[1].max() == pytest.approx(torch.log(torch.tensor(1e-5)).item(), abs=1e-3)  # silence = the floor
    band = int(m[0, :, 50].argmax())  # 220 Hz falls in a low band
    assert band < 12
    f0 = f0_track(wav)
    assert f0.shape == (2, 100)
    assert (f0[0, 4:-4] - 220.0).abs().max() < 3.0 and (f0[1] == 0).all()
    chirp = 0.5 * torch.sin(2 * torch.pi * 140.0 * t[: 256 * 40])
    assert f0_track(chirp[None])[0, 10:-10].sub(140.0).abs().max() < 3.0
    noise = 0.3 * torch.randn(1, 256 * 40, generator=torch.Generator().manual_seed(0))
    assert (f0_track(noise) == 0).float().mean() > 0.8  # noise is mostly unvoiced


# ------------------------------------------------------------------------------------------------ stage


class Losses(L.Callback):
    def __init__(self):
        self.losses = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses[trainer.global_step] = (float(outputs["loss"]), float(outputs["loss_d"]))


def make(prepared, tmp_path, max_steps, callbacks, **kw):
    L.seed_everything(5)
    model = MelVocoder(config="tiny", overrides=TEST_SIZES, lr=1e-3, export_dir=str(tmp_path / "export"), **kw)
    data = MelVocoderDataModule(segment_frames=4, val_max_frames=16, data_dir=str(prepared), batch_size=2, num_workers=0)
    trainer = L.Trainer(accelerator="cpu", max_steps=max_steps, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=1,
                        val_check_interval=max(1, max_steps // 2), check_val_every_n_epoch=None, callbacks=callbacks,
                        default_root_dir=str(tmp_path), plugins=[AtomicCheckpointIO()])
    return model, data, trainer


def test_fit_steps_and_export_round_trip(prepared, tmp_path):
    losses = Losses()
    model, data, trainer = make(prepared, tmp_path, 6, [losses, Export()])
    trainer.fit(model, data)
    batch = next(iter(data.train_dataloader()))
    assert batch["audio"].shape == (2, 4 * 256)
    assert sorted(losses.losses) == [2, 4, 6] and trainer.global_step == 6  # two optimiser steps per batch
    assert all(torch.isfinite(torch.tensor(v)).all() for v in losses.losses.values())
    assert "val/mel_l1" in trainer.callback_metrics and torch.isfinite(trainer.callback_metrics["val/mel_l1"])
    assert {"train/f0_l1", "train/tpr", "train/feature_matching"} <= set(trainer.callback_metrics)

    loaded, meta = load_mel_vocoder(tmp_path / "export")
    assert (meta["kind"], meta["sample_rate"], meta["n_mels"], meta["hop"]) == ("mel_vocoder", 22050, 80, 256)
    assert meta["mel"]["n_fft"] == 1024 and meta["mel"]["f_max"] == 8000.0
    mel = torch.randn(2, 80, 9) - 5
    with torch.no_grad():
        ours = model.generator.cpu().eval()(mel, generator=torch.Generator().manual_seed(3))[0]
        theirs = loaded(mel, generator=torch.Generator().manual_seed(3))[0]
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-4)

    cfg = tmp_path / "export" / "config.json"
    bad = json.loads(cfg.read_text())
    cfg.write_text(json.dumps({**bad, "hop": 128}))
    with pytest.raises(ValueError, match=r"config.json: field 'hop' is 128"):
        load_mel_vocoder(tmp_path / "export")


def test_resume_gives_identical_next_losses(prepared, tmp_path):
    full = Losses()
    model, data, trainer = make(prepared, tmp_path / "a", 8, [full])
    trainer.fit(model, data)
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "b", save_last=True, save_top_k=0, every_n_train_steps=4)
    model, data, trainer = make(prepared, tmp_path / "b", 4, [ckpt])
    trainer.fit(model, data)
    resumed = Losses()
    model, data, trainer = make(prepared, tmp_path / "c", 8, [resumed])
    trainer.fit(model, data, ckpt_path=str(tmp_path / "b" / "last.ckpt"))
    assert sorted(resumed.losses) == [6, 8]
    for step in (6, 8):
        assert resumed.losses[step] == pytest.approx(full.losses[step], rel=1e-5), step


def test_bad_stage_inputs(prepared):
    with pytest.raises(ValueError, match=r"model.config: unknown mel-vocoder preset 'huge'; known: \[.*'tiny', 'vocos', 'vocos-tiny'\]"):
        MelVocoder(config="huge")
    with pytest.raises(ValueError, match="data.segment_frames: must be a positive integer"):
        MelVocoderDataModule(segment_frames=0, data_dir=str(prepared))


def test_recipe_stage7_hift(capsys, monkeypatch):
    from tests.test_paper_recipes import printed

    cfg = printed(ROOT / "recipes" / "stage7_hift.yaml", capsys, monkeypatch)
    m, d = cfg["model"]["init_args"], cfg["data"]["init_args"]
    assert m["config"] == "tiny" and d["hop"] == HiFTConfig.from_name("tiny").hop == 256
    assert d["audio_rate"] == HiFTConfig.from_name("tiny").sampling_rate == 22050
