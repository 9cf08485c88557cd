"""Vocos mel vocoder (``nn/vocos.py``, trained by stage 7 ``stages/mel_vocoder.py``): the "same"-padded iSTFT inverts
the mel front end's STFT exactly, the generator's shapes and HiFT's inference contract, a short fit learns the mel,
the export round trip with its ``generator`` field, streaming through ``Token2Wav``, and the errors of bad exports."""

import json
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from datamodules.mel_vocoder import MelVocoderDataModule
from lit_keomni.checkpoints import Export, load_mel_vocoder
from lit_keomni.nn.hift import MelFrontEnd
from lit_keomni.nn.vocos import VocosConfig, VocosGenerator, istft_same, mel_vocoder_family
from lit_keomni.stages.mel_vocoder import MelVocoder
from tests.test_hift import Losses

ROOT = Path(__file__).resolve().parent.parent
TEST_SIZES = {"dim": 32, "intermediate_dim": 64, "num_layers": 2, "mpd_channels": (4, 4, 8, 8, 8), "mrd_channels": 4,
              "mrd_resolutions": ((512, 50, 240), (256, 32, 128))}


def test_istft_same_inverts_the_front_ends_stft():
    """The STFT ``MelFrontEnd`` takes (reflect padding of (n_fft - hop) / 2, no centring) and ``istft_same`` give the
    signal back, every sample, frame t where the front end read it."""
    x = torch.randn(2, 256 * 20, generator=torch.Generator().manual_seed(0))
    window = torch.hann_window(1024)
    padded = F.pad(x[:, None], (384, 384), mode="reflect")[:, 0]
    spec = torch.stft(padded, 1024, 256, window=window, center=False, return_complex=True)
    assert spec.shape == (2, 513, 20)
    y = istft_same(spec, 1024, 256, window)
    assert y.shape == x.shape
    torch.testing.assert_close(y, x, atol=1e-5, rtol=0)
    # a frame zeroed in the STFT silences the samples it was centred on
    spec[:, :, 10] = 0
    hole = istft_same(spec, 1024, 256, window) - x
    assert hole[:, 10 * 256: 11 * 256].abs().mean() > 10 * hole[:, : 4 * 256].abs().mean()


def test_generator_shapes_and_contract():
    c = VocosConfig.from_name("vocos-tiny", **TEST_SIZES)
    g = VocosGenerator(c).eval()
    mel = torch.randn(2, 80, 13) - 5
    wav, f0 = g(mel)
    assert wav.shape == (2, 13 * 256) and f0 is None and wav.abs().max() <= c.audio_limit
    out, source = g.inference(mel, cache_source=torch.zeros(2, 1, 256))
    assert source.shape == (2, 1, 0)
    torch.testing.assert_close(out, wav)
    assert g.remove_weight_norm() is g
    with pytest.raises(ValueError, match=r"VocosGenerator: mel must be \(B, 80, T\), got shape \(2, 40, 13\)"):
        g(torch.randn(2, 40, 13))
    with pytest.raises(ValueError, match="VocosConfig: field 'kernel_size' 6 must be odd"):
        VocosConfig(kernel_size=6)
    with pytest.raises(ValueError, match="VocosConfig: field 'n_fft' 200 must be even, at least 'hop' 256"):
        VocosConfig(n_fft=200)
    assert (mel_vocoder_family("vocos-tiny"), mel_vocoder_family("tiny")) == ("vocos", "hift")
    full = sum(p.numel() for p in VocosGenerator(VocosConfig.from_name("vocos")).parameters())
    assert 13.0e6 < full < 14.0e6  # Vocos's published mel model: 13.5 M


def test_generator_learns_the_mel_of_a_batch(prepared):
    """The generator alone, mel L1 against the audio of two utterances: the loss falls below half its start."""
    torch.manual_seed(0)
    data = MelVocoderDataModule(segment_frames=24, val_max_frames=24, data_dir=str(prepared), batch_size=2,
                                num_workers=0)
    data.setup("fit")
    wav = next(iter(data.train_dataloader()))["audio"]
    g = VocosGenerator(VocosConfig.from_name("vocos-tiny", **TEST_SIZES))
    front, loss_mel = MelFrontEnd(), MelFrontEnd(f_max=11025)
    mel, target = front(wav), loss_mel(wav)
    opt = torch.optim.Adam(g.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        loss = F.l1_loss(loss_mel(g(mel)[0]), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.detach().item())
    assert losses[-1] < 0.5 * losses[0], (losses[0], losses[-1])


def make(prepared, tmp_path, max_steps, callbacks):
    L.seed_everything(5)
    model = MelVocoder(config="vocos-tiny", overrides=TEST_SIZES, lr=1e-3, f0_weight=0.0,
                       export_dir=str(tmp_path / "export"))
    data = MelVocoderDataModule(segment_frames=4, val_max_frames=16, data_dir=str(prepared), batch_size=2, num_workers=0)
    trainer = L.Trainer(accelerator="cpu", max_steps=max_steps, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=1,
                        val_check_interval=max(1, max_steps // 2), check_val_every_n_epoch=None, callbacks=callbacks,
                        default_root_dir=str(tmp_path))
    return model, data, trainer


def test_fit_and_export_round_trip(prepared, tmp_path):
    losses = Losses()
    model, data, trainer = make(prepared, tmp_path, 6, [losses, Export()])
    trainer.fit(model, data)
    assert sorted(losses.losses) == [2, 4, 6]
    assert all(torch.isfinite(torch.tensor(v)).all() for v in losses.losses.values())
    assert "train/f0_l1" not in trainer.callback_metrics and "train/tpr" in trainer.callback_metrics
    assert torch.isfinite(trainer.callback_metrics["val/mel_l1"])

    loaded, meta = load_mel_vocoder(tmp_path / "export")
    assert isinstance(loaded, VocosGenerator)
    assert (meta["generator"], meta["sample_rate"], meta["hop"]) == ("vocos", 22050, 256)
    assert meta["mel"] == MelFrontEnd().settings()  # the mel a flow decoder writes: HiFT's
    mel = torch.randn(1, 80, 9) - 5
    with torch.no_grad():
        torch.testing.assert_close(loaded(mel)[0], model.generator.cpu().eval()(mel)[0])

    cfg = tmp_path / "export" / "config.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "generator": "wavenet"}))
    with pytest.raises(ValueError, match=r"export/config.json: field 'generator' is 'wavenet', expected one of "
                                         r"\['hift', 'vocos'\]"):
        load_mel_vocoder(tmp_path / "export")


def test_flow_decoder_streams_through_vocos(tmp_path, stage1_export):
    """``Token2Wav`` with a Vocos: offline audio of the right length, streamed blocks the same length and close."""
    from lit_keomni.checkpoints import load_flow_decoder, write_export
    from lit_keomni.configs import config_dict
    from lit_keomni.release import release_glm4voice_decoder
    from lit_keomni.token2wav import load_token2wav, stream_difference
    from tests.exports import tiny_decoder

    torch.manual_seed(0)
    c = VocosConfig.from_name("vocos-tiny", **TEST_SIZES)
    vocos = write_export(tmp_path / "vocos", kind="mel_vocoder", config=config_dict(c),
                         state_dict=VocosGenerator(c).state_dict(),
                         extra={"generator": "vocos", "sample_rate": 22050, "n_mels": 80, "hop": 256,
                                "mel": MelFrontEnd().settings()})
    decoder = tiny_decoder(tmp_path / "decoder", stage1_export, vocos)
    t2w = load_token2wav(decoder, n_timesteps=2)
    assert isinstance(t2w.vocoder, VocosGenerator)
    tokens = list(range(12)) * 3
    wav = t2w.offline(tokens)
    assert wav.shape == (t2w.frames(len(tokens)) * 256,)
    diff = stream_difference(t2w, tokens, (10, 20))
    assert diff["samples"] == wav.numel() and diff["snr_db"] > 0
    # the released layout holds a HiFT: a Vocos decoder cannot go out as glm-4-voice-decoder
    assert load_flow_decoder(decoder)[0] is not None
    with pytest.raises(ValueError, match=r"mel_vocoder/config.json: field 'generator' is 'vocos'; the "
                                         r"glm-4-voice-decoder layout holds a HiFT"):
        release_glm4voice_decoder(decoder, tmp_path / "released")


def test_recipe_stage7_vocos(capsys, monkeypatch):
    from tests.test_paper_recipes import printed

    cfg = printed(ROOT / "recipes" / "stage7_vocos.yaml", capsys, monkeypatch)
    m, d = cfg["model"]["init_args"], cfg["data"]["init_args"]
    c = VocosConfig.from_name(m["config"])
    assert m["config"] == "vocos-tiny" and d["hop"] == c.hop == 256 and d["audio_rate"] == c.sampling_rate == 22050
    assert m["export_dir"] == "checkpoints/stage7_vocos/export"
