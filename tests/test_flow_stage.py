"""Stage 7 flow decoder (``stages.flow_decoder``, ``datamodules.flow_decoder``) and ``token2wav`` on tiny models: the
loss falls; a resumed run repeats the uninterrupted one's losses; the export round-trips (same mel for the same
noise); exports that do not belong together fail naming file and field; streamed synthesis equals offline for one
block and its difference is measured otherwise; the released decoder folder imports; chat speaks through it."""

import json
import shutil
from pathlib import Path

import lightning as L
import pytest
import torch

from datamodules.flow_decoder import FlowDecoderDataModule, token_frames
from lit_keomni.checkpoints import Export, export_fingerprint, load_flow_decoder, unit_meta
from lit_keomni.cli import main as cli
from lit_keomni.nn.flow import FlowConfig, FlowDecoder
from lit_keomni.nn.hift import HiFTConfig, HiFTGenerator, from_released, hift_state_to_released
from lit_keomni.stages.flow_decoder import SpeechFlowDecoder
from lit_keomni.token2wav import (
    SpeechStream,
    Token2Wav,
    load_token2wav,
    stream_difference,
)
from tests.exports import FLOW_TINY, HIFT_TINY, tiny_decoder, tiny_mel_vocoder

ROOT = Path(__file__).resolve().parent.parent
GOLDEN_FLOW = ROOT / "tests" / "golden" / "glm4voice_flow"
GOLDEN_HIFT = ROOT / "tests" / "golden" / "glm4voice_hift.json"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def mel_vocoder(tmp_path_factory) -> Path:
    """A random-weight tiny "mel_vocoder" export (what stage 7 HiFT writes)."""
    return tiny_mel_vocoder(tmp_path_factory.mktemp("hift") / "export")


def datamodule(prepared, stage1_export, speech_tokens, out: Path) -> FlowDecoderDataModule:
    return FlowDecoderDataModule(units_from=str(stage1_export), tokens_dir=str(speech_tokens), data_dir=str(prepared),
                                 out_dir=str(out), crop_tokens=10, val_max_tokens=16, batch_size=4, num_workers=0)


@pytest.fixture(scope="module")
def pairs(prepared, stage1_export, speech_tokens, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("flow-pairs")
    dm = datamodule(prepared, stage1_export, speech_tokens, out)
    dm.prepare_data()
    return out


class Losses(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def fit(tmp: Path, stage1_export, data: FlowDecoderDataModule, max_steps: int, *, ckpt_path=None, val=0,
        callbacks=(), **model_kw) -> tuple[SpeechFlowDecoder, L.Trainer, list[float]]:
    L.seed_everything(11)
    kw = dict(config="tiny", overrides=FLOW_TINY, units_from=str(stage1_export), lr=3e-3, warmup_steps=2,
              export_dir=str(tmp / "export"), val_samples=2, val_n_timesteps=2)
    model = SpeechFlowDecoder(**{**kw, **model_kw})
    losses = Losses()
    trainer = L.Trainer(accelerator="cpu", max_steps=max_steps, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=val,
                        val_check_interval=max_steps if val else None, check_val_every_n_epoch=None,
                        callbacks=[losses, Export(), *callbacks], default_root_dir=str(tmp))
    trainer.fit(model, data, ckpt_path=ckpt_path)
    return model, trainer, losses.losses


def test_frame_rule_is_the_flows():
    flow = FlowDecoder(FlowConfig.from_name("tiny", **FLOW_TINY))
    n = torch.arange(0, 400)
    assert [token_frames(int(i), 12.5, 22050, 256) for i in n] == flow.mel_frames(n).tolist()


def test_pairs_crops_and_validation_items(prepared, stage1_export, speech_tokens, pairs):
    dm = datamodule(prepared, stage1_export, speech_tokens, pairs)
    dm.prepare_data()  # current: nothing rebuilt
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["codes"].shape[1] <= 10 and batch["mel"].shape[-1] == 80
    assert batch["mel_lengths"].tolist() == [token_frames(int(n), 12.5, 22050, 256) for n in batch["codes_lengths"]]
    assert int(batch["codes"].max()) < unit_meta(stage1_export)["num_units"]
    val = next(iter(dm.val_dataloader()))
    assert (val["audio_lengths"] == val["mel_lengths"] * 256).all() and val["text"] and val["language"]
    nobody = datamodule(prepared, stage1_export, speech_tokens, pairs.parent / "nobody")
    nobody.speaker = "nobody"
    with pytest.raises(ValueError, match=r"chunks/train: no utterances with speech tokens and field 'speaker' == "
                                         r"'nobody' \(data.speaker\)"):
        nobody.prepare_data()
    with pytest.raises(ValueError, match=r"data.crop_tokens: must be a positive integer, got 0"):
        FlowDecoderDataModule(units_from=str(stage1_export), crop_tokens=0)


def test_loss_falls_and_validation_reports(tmp_path, prepared, stage1_export, speech_tokens, pairs, mel_vocoder):
    data = datamodule(prepared, stage1_export, speech_tokens, pairs)
    model, trainer, losses = fit(tmp_path, stage1_export, data, 30, val=1, lr=1e-2, mel_vocoder=str(mel_vocoder),
                                 asr_from=str(stage1_export))
    assert all(torch.isfinite(torch.tensor(losses)))
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    print(f"flow loss: {first:.3f} (first 3 steps) -> {last:.3f} (last 3)")
    assert last < 0.7 * first
    metrics = trainer.callback_metrics
    for name in ("val/loss", "val/mel_l1", "val/resynth_cer", "val/orig_cer"):
        assert name in metrics and torch.isfinite(metrics[name]), name
    export = tmp_path / "export"
    meta = json.loads((export / "config.json").read_text())
    assert meta["kind"] == "flow_decoder" and meta["codebook_size"] == 16 and meta["frame_rate_hz"] == 12.5
    assert meta["units_fingerprint"] == export_fingerprint(stage1_export) and meta["sample_rate"] == 22050
    assert (export / "mel_vocoder" / "config.json").is_file()  # the mel vocoder travels with the export
    # round trip: the loaded export gives the module's mel for the same tokens and noise
    flow, _ = load_flow_decoder(export)
    tokens = torch.randint(0, 16, (1, 23))
    noise = torch.randn(1, 80, int(flow.mel_frames(torch.tensor([23]))[0]))
    model.flow.eval()
    torch.testing.assert_close(flow.inference(tokens, n_timesteps=3, noise=noise),
                               model.flow.inference(tokens, n_timesteps=3, noise=noise))
    t2w = load_token2wav(export, n_timesteps=2)
    assert t2w.offline(tokens[0]).numel() == t2w.frames(23) * 256


def test_prior_weight_trains_the_encoder_towards_the_mel(tmp_path, prepared, stage1_export, speech_tokens, pairs):
    """With ``prior_weight`` the encoder's mu learns the mel itself (Grad-TTS's encoder loss): its held-out distance
    to the mel falls well below that of a run on the flow-matching loss alone."""
    data = datamodule(prepared, stage1_export, speech_tokens, pairs)
    priors = {}
    for w in (0.0, 1.0):
        _, trainer, _ = fit(tmp_path / str(w), stage1_export, data, 20, val=1, lr=1e-2, prior_weight=w)
        priors[w] = float(trainer.callback_metrics["val/prior"])
    assert priors[1.0] < 0.5 * priors[0.0], priors


class Parameters(L.Callback):
    """The estimator's and the encoder's parameters after every optimiser step."""

    def __init__(self) -> None:
        self.after: list[tuple[torch.Tensor, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        flow = pl_module.flow
        self.after.append(tuple(torch.cat([p.detach().flatten().clone() for p in m.parameters()])
                                for m in (flow.estimator, flow.encoder)))


def test_prior_steps_train_the_encoder_alone_first(tmp_path, prepared, stage1_export, speech_tokens, pairs):
    """``prior_steps``: the first steps move the encoder (on the encoder loss, ``FlowDecoder.prior_loss``) and leave
    the estimator exactly as initialised (no gradient, no weight decay); the steps after move both."""
    data = datamodule(prepared, stage1_export, speech_tokens, pairs)
    params = Parameters()
    model, _, losses = fit(tmp_path, stage1_export, data, 5, prior_steps=3, prior_weight=1.0, callbacks=[params])
    L.seed_everything(11)
    start = SpeechFlowDecoder(config="tiny", overrides=FLOW_TINY, units_from=str(stage1_export))
    start.configure_model()
    est0 = torch.cat([p.detach().flatten() for p in start.flow.estimator.parameters()])
    enc0 = torch.cat([p.detach().flatten() for p in start.flow.encoder.parameters()])
    estimators, encoders = zip(*params.after)
    assert all(torch.equal(e, est0) for e in estimators[:3]) and not torch.equal(estimators[3], est0)
    assert not torch.equal(encoders[0], enc0) and not torch.equal(encoders[3], encoders[2])
    # a prior step's loss is the encoder loss of FlowDecoder.loss, without its flow-matching term
    batch = next(iter(data.train_dataloader()))
    mel = batch["mel"].transpose(1, 2)
    flow = model.flow.eval()
    with torch.no_grad():
        full = flow.loss(batch["codes"], batch["codes_lengths"], mel, batch["mel_lengths"])
        prior = flow.prior_loss(batch["codes"], batch["codes_lengths"], mel, batch["mel_lengths"])
    torch.testing.assert_close(prior, full["prior"])
    assert len(losses) == 5 and losses[0] > losses[2]
    with pytest.raises(ValueError, match="model.prior_steps: must be >= 0"):
        SpeechFlowDecoder(prior_steps=-1)


class StopAt(L.Callback):
    """Interrupts a run after ``step`` optimiser steps (its learning-rate schedule still planned for max_steps)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True


def test_exact_resume(tmp_path, prepared, stage1_export, speech_tokens, pairs):
    data = lambda: datamodule(prepared, stage1_export, speech_tokens, pairs)  # noqa: E731
    _, _, whole = fit(tmp_path / "a", stage1_export, data(), 6)
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "b"), save_top_k=-1, every_n_train_steps=3)
    fit(tmp_path / "b", stage1_export, data(), 6, callbacks=[ckpt, StopAt(3)])
    _, _, resumed = fit(tmp_path / "b", stage1_export, data(), 6, ckpt_path=str(tmp_path / "b" / "epoch=0-step=3.ckpt"))
    assert resumed == pytest.approx(whole[3:], rel=1e-5, abs=1e-6)


def test_handoff_errors(tmp_path, prepared, stage1_export, speech_tokens, pairs):
    data = datamodule(prepared, stage1_export, speech_tokens, pairs)
    with pytest.raises(ValueError, match=r"model.overrides.vocab_size is 32, but .*stage1.*/config.json field "
                                         r"'codebook_size' is 16"):
        fit(tmp_path, stage1_export, data, 1, overrides={**FLOW_TINY, "vocab_size": 32})
    with pytest.raises(ValueError, match=r"model.asr_from needs model.mel_vocoder"):
        SpeechFlowDecoder(units_from=str(stage1_export), asr_from=str(stage1_export))


def tiny_token2wav(seed: int = 0, vocab: int = 16) -> Token2Wav:
    torch.manual_seed(seed)
    flow = FlowDecoder(FlowConfig.from_name("tiny", vocab_size=vocab, **FLOW_TINY))
    hift = HiFTGenerator(HiFTConfig.from_name("tiny", **HIFT_TINY)).remove_weight_norm()
    return Token2Wav(flow, hift, n_timesteps=3)


def test_streaming_equals_offline_for_one_block_and_is_measured_otherwise(capsys):
    t2w = tiny_token2wav()
    tokens = torch.randint(0, 16, (60,)).tolist()
    one = stream_difference(t2w, tokens, [60])
    assert one["max_abs"] == 0.0 and one["samples"] == t2w.frames(60) * 256
    for blocks in ([10, 20], [25, 50]):
        d = stream_difference(t2w, tokens, blocks)
        with capsys.disabled():
            print(f"\nstreamed {blocks} vs offline, 60 tokens: max abs {d['max_abs']:.4f}, SNR {d['snr_db']:.1f} dB")
        assert d["samples"] == one["samples"] and d["max_abs"] < 1.0
    # tokens pushed in uneven pieces decode the same blocks as stream() of those blocks
    s = t2w.streamer(blocks=(10, 20))
    pushed = [c for i in range(0, 60, 7) for c in s.push(tokens[i: i + 7])] + s.flush()
    streamed = list(t2w.stream([tokens[:10], tokens[10:30], tokens[30:50], tokens[50:]]))
    assert [c.numel() for c in pushed] == [c.numel() for c in streamed]
    torch.testing.assert_close(torch.cat(pushed), torch.cat(streamed))
    assert pushed[0].numel() == (t2w.frames(10) - t2w.overlap_frames - 1) * 256  # held back: overlap + cache frame
    with pytest.raises(ValueError, match=r"prompt_tokens and prompt_mel go together.*got only prompt_tokens"):
        t2w.mel(tokens[10:20], prompt_tokens=tokens[:10])
    with pytest.raises(ValueError, match=r"speech token 16 is outside the decoder's vocabulary of 16"):
        t2w.offline([3, 16])
    with pytest.raises(ValueError, match=r"block sizes \[0\] must be positive"):
        SpeechStream(t2w, blocks=(0,))


def released_folder(tmp: Path, hift_section: dict | None = None) -> Path:
    """A released-style decoder folder from the golden pieces: the golden flow (config.yaml + flow.pt) and a random
    HiFT of the config's hift section saved as the released hift.pt is (weight_g / weight_v)."""
    from lit_keomni.layouts.glm4voice_decoder import read_decoder_config

    folder = tmp / "glm-4-voice-decoder"
    shutil.copytree(GOLDEN_FLOW, folder)
    (folder / "reference.safetensors").unlink()
    section = read_decoder_config(folder)["hift"]
    if hift_section is not None:
        text = (folder / "config.yaml").read_text()
        (folder / "config.yaml").write_text(text.replace("    in_channels: 16\n    base_channels",
                                                         f"    in_channels: {hift_section['in_channels']}\n    base_channels")
                                            .replace("        in_channels: 16\n        cond",
                                                     f"        in_channels: {hift_section['in_channels']}\n        cond"))
        section = hift_section
    torch.manual_seed(1)
    torch.save(hift_state_to_released(HiFTGenerator(from_released(section))), folder / "hift.pt")
    return folder


def test_import_released_decoder(tmp_path, capsys):
    folder = released_folder(tmp_path)
    out = tmp_path / "decoder"
    cli(["import", "glm4voice-decoder", str(folder), "--out", str(out)])
    assert f"wrote {out}" in capsys.readouterr().out
    meta = json.loads((out / "config.json").read_text())
    assert meta["kind"] == "flow_decoder" and meta["codebook_size"] == 40 and meta["n_mels"] == 16
    assert meta["units_fingerprint"] is None
    tokens = torch.randint(0, 40, (17,))
    ours, released = load_token2wav(out, n_timesteps=2), load_token2wav(folder, n_timesteps=2)
    torch.testing.assert_close(ours.offline(tokens), released.offline(tokens))
    # a vocoder reading 80 bins behind a flow writing 16: one error naming the file and both fields
    bad = released_folder(tmp_path / "bad", json.loads(GOLDEN_HIFT.read_text())["hift"])
    with pytest.raises(SystemExit, match=r"config.yaml: field 'flow.output_size' is 16, but 'hift.in_channels' is 80"):
        cli(["import", "glm4voice-decoder", str(bad), "--out", str(tmp_path / "bad_out")])


def test_release_writes_the_released_decoder_layout_back(tmp_path, capsys):
    """import -> release gives the released folder back: config.yaml reads to the same configs, flow.pt and hift.pt
    hold the released tensors under the released names, and the folder decodes the same audio."""
    from lit_keomni.layouts.glm4voice_decoder import flow_config_from_released, read_decoder_config
    from lit_keomni.nn.hift import from_released as hift_from_released

    folder = released_folder(tmp_path)
    export, back = tmp_path / "decoder", tmp_path / "released"
    cli(["import", "glm4voice-decoder", str(folder), "--out", str(export)])
    cli(["release", str(export), "--out", str(back)])
    assert f"wrote {back}" in capsys.readouterr().out
    assert sorted(p.name for p in back.iterdir()) == ["config.yaml", "flow.pt", "hift.pt"]
    theirs, ours = read_decoder_config(folder), read_decoder_config(back)
    assert flow_config_from_released(ours["flow"]) == flow_config_from_released(theirs["flow"])
    assert hift_from_released(ours["hift"]) == hift_from_released(theirs["hift"])
    for name in ("flow.pt", "hift.pt"):
        a = torch.load(folder / name, map_location="cpu", weights_only=True)
        b = torch.load(back / name, map_location="cpu", weights_only=True)
        assert set(a) == set(b), name
        for k, v in a.items():
            torch.testing.assert_close(b[k], v, rtol=0, atol=1e-7, msg=f"{name}: {k}")
    tokens = torch.randint(0, 40, (23,))
    torch.testing.assert_close(load_token2wav(back, n_timesteps=2).offline(tokens),
                               load_token2wav(folder, n_timesteps=2).offline(tokens))
    # a flow that samples from a start time the released sampler lacks is refused, naming the field
    meta = json.loads((export / "config.json").read_text())
    meta["config"]["inference_start"] = 0.5
    (export / "config.json").write_text(json.dumps(meta))
    with pytest.raises(SystemExit, match=r"field 'inference_start' is 0.5; set it to 0 in"):
        cli(["release", str(export), "--out", str(tmp_path / "shallow")])
    # a decoder without its HiFT cannot make a released folder: one error naming the missing folder
    shutil.rmtree(export / "mel_vocoder")
    with pytest.raises(SystemExit, match=r"mel_vocoder: missing; a released decoder folder holds the HiFT too"):
        cli(["release", str(export), "--out", str(tmp_path / "no_hift")])


def decoder_export(out: Path, stage1: Path, mel_vocoder: Path, *, fingerprint: str | None = None) -> Path:
    return tiny_decoder(out, stage1, mel_vocoder, fingerprint=fingerprint)


def test_chat_speaks_through_the_flow_decoder(tmp_path, mel_vocoder, capsys):
    import numpy as np
    import soundfile as sf

    from lit_keomni.chat import GlmChat
    from tests.exports import tiny_exports

    exports = tiny_exports(tmp_path / "exports")
    decoder = decoder_export(tmp_path / "decoder", exports["stage1"], mel_vocoder)
    sr = 16000
    question = tmp_path / "q" / "q.wav"
    question.parent.mkdir()
    t = np.arange(int(1.3 * sr)) / sr
    sf.write(question, 0.3 * np.sin(2 * np.pi * 220 * t), sr)
    out, report = tmp_path / "out", tmp_path / "chat.json"
    cli(["chat", str(question), "--pipeline", "glm", "--model", str(exports["glm"]), "--decoder", str(decoder),
         "--out", str(out), "--json", str(report), "--max-new-tokens", "4", "--max-speech-seconds", "3",
         "--block", "10", "--ode-steps", "2", "--no-asr"])
    assert "first audio" in capsys.readouterr().out
    row = json.loads(report.read_text())["results"][0]
    audio, rate = sf.read(row["output"])
    assert rate == 22050 and len(audio) == token_frames(row["units"], 12.5, 22050, 256) * 256
    assert row["audio_chunks"] > 1 and row["first_audio_s"] > 0 and {"flow", "vocoder"} <= set(row["times_s"])
    # a decoder trained on another tokenizer's tokens is refused before anything is loaded
    other = decoder_export(tmp_path / "other", exports["stage1"], mel_vocoder, fingerprint="e" * 64)
    with pytest.raises(ValueError, match=r"other/config.json: field 'units_fingerprint' is 'e+', expected .*another "
                                         r"tokenizer"):
        GlmChat.load(exports["glm"], None, decoder=other)
    with pytest.raises(SystemExit, match=r"--decoder is GLM-4-Voice's speech decoder: use it with --pipeline glm"):
        cli(["chat", str(question), "--model", str(exports["keomni"]), "--decoder", str(decoder)])


def test_paper_recipe_batches_20000_frames():
    """recipes/paper/stage7_flow.yaml: the released sizes, FSDP2 in bf16, ≈ 20,000 mel frames per step (App. B.2)."""
    import yaml

    cfg = yaml.safe_load((ROOT / "recipes" / "paper" / "stage7_flow.yaml").read_text())
    m, d, t = cfg["model"]["init_args"], cfg["data"]["init_args"], cfg["trainer"]
    assert m["config"] == "glm-4-voice-decoder" and m["lr"] == 1e-3 and t["max_epochs"] == 2
    assert t["precision"] == "bf16-mixed"
    assert t["strategy"]["class_path"] == "lightning.pytorch.strategies.ModelParallelStrategy"
    ranks = t["strategy"]["init_args"]["data_parallel_size"]
    assert ranks == t["devices"] * t["num_nodes"]
    frames = ranks * d["batch_size"] * t["accumulate_grad_batches"] * token_frames(d["crop_tokens"], 12.5, 22050, 256)
    assert abs(frames - 20000) / 20000 < 0.05
    flow = FlowDecoder(FlowConfig.from_name("glm-4-voice-decoder"))
    assert 105e6 < sum(p.numel() for p in flow.parameters()) < 115e6


def test_cpu_recipe_trains_one_voice_with_the_encoder_loss(capsys, monkeypatch):
    """recipes/stage7_flow.yaml: one agent voice (tokens do not say who speaks; over all speakers the mel the
    encoder must predict is an average of voices) and the encoder loss beside the flow loss, within 30 minutes."""
    from tests.test_paper_recipes import printed

    cfg = printed(ROOT / "recipes" / "stage7_flow.yaml", capsys, monkeypatch)
    m, d, t = cfg["model"]["init_args"], cfg["data"]["init_args"], cfg["trainer"]
    assert d["speaker"] == "agentFemale" and m["prior_weight"] == 1.0 and m["config"] == "tiny"
    assert m["overrides"] == {"inference_start": 0.5, "inference_temperature": 0.0}
    assert t["max_time"] == "00:00:30:00" and t["max_steps"] == 16000 and m["prior_steps"] == 10000
