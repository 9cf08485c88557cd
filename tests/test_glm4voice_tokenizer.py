"""GLM-4-Voice's released speech tokenizer as a stage-1 export: the reference's features, token ids and ASR logits
(golden files made by THUDM's speech_tokenizer code, tests/golden/make_glm4voice_tokenizer.py), the released layout
back with identical tensors, stage 1 continuing from it, and one clear error per wrong input."""

import json
import shutil
from pathlib import Path

import lightning as L
import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file, save_file

from lit_keomni.checkpoints import load_speech_tokenizer, read_export_meta
from lit_keomni.cli import main
from lit_keomni.nn.audio import LogMel
from lit_keomni.release import import_speech_tokenizer, release
from lit_keomni.speech_tokens import SpeechTokenEncoder

GOLDEN = Path(__file__).resolve().parent / "golden" / "glm4voice_tokenizer"
REF = load_file(str(GOLDEN / "reference.safetensors"))


def clip(i: int) -> torch.Tensor:
    return torch.from_numpy(sf.read(GOLDEN / f"clip_{i}.flac", dtype="float32")[0])


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("glm4voice") / "stage1"
    main(["import", "glm4voice-tokenizer", str(GOLDEN), "--out", str(out)])
    return out


def test_features_are_the_reference_extractors():
    mel, lengths = LogMel(n_mels=128).padded([clip(0)], 1280)
    want = REF["mel_0"]
    assert mel.shape[1:] == want.shape and lengths.tolist() == [-(-len(clip(0)) // 160)]
    torch.testing.assert_close(mel[0], want, atol=2e-5, rtol=0)


def test_tokenize_gives_the_reference_ids(export):
    """Each clip alone, all three in one batch, and the 31 s clip as two 30 s windows: the reference's ids exactly."""
    meta = read_export_meta(export, "speech_tokenizer")
    assert meta["frame_rate_hz"] == 12.5 and meta["codebook_size"] == 64
    assert meta["weights_source"] == {"format": "glm4voice-tokenizer", "folder": str(GOLDEN)}
    encoder = SpeechTokenEncoder(export)
    clips = [clip(i) for i in range(3)]
    together = encoder(clips)
    for i, c in enumerate(clips):
        want = REF[f"ids_alone_{i}"].tolist()
        assert encoder([c])[0].tolist() == want, i
        assert together[i].tolist() == want == REF[f"ids_batch_{i}"].tolist(), i
    assert len(together[2]) == 375 + 13  # 30 s + 1 s, one token per started 80 ms of each window


def test_asr_logits_are_the_reference_models(export):
    model, _, _ = load_speech_tokenizer(export)
    logmel = LogMel(n_mels=128)
    for i in (0, 1):
        mel, lengths = logmel.padded([clip(i)], 1280)
        with torch.no_grad():
            logits, _ = model(mel, lengths, REF["decoder_ids"])
        want = REF[f"logits_{i}"]
        torch.testing.assert_close(logits[..., : want.shape[-1]], want, atol=1e-4, rtol=1e-4)


def test_release_gives_the_released_layout_back(export, tmp_path):
    back = release(export, tmp_path / "released")
    a, b = load_file(str(GOLDEN / "model.safetensors")), load_file(str(back / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    theirs, ours = json.loads((GOLDEN / "config.json").read_text()), json.loads((back / "config.json").read_text())
    for field in ("num_mel_bins", "d_model", "encoder_layers", "decoder_layers", "encoder_attention_heads",
                  "encoder_ffn_dim", "vocab_size", "max_source_positions", "pooling_kernel_size", "pooling_type",
                  "pooling_position", "quantize_vocab_size", "quantize_position", "quantize_causal_block_size",
                  "quantize_ema_decay", "encoder_causal_convolution", "quantize_causal_encoder",
                  "encoder_causal_attention", "architectures"):
        assert ours[field] == theirs[field], field
    assert ours["quantize_loss_scale"] * ours["quantize_commit_coefficient"] == pytest.approx(
        theirs["quantize_loss_scale"] * theirs["quantize_commit_coefficient"])
    fe = json.loads((back / "preprocessor_config.json").read_text())
    assert fe["feature_size"] == 128 and fe["hop_length"] == 160
    # and the released folder imports again to the same ids
    again = import_speech_tokenizer(back, tmp_path / "again")
    assert SpeechTokenEncoder(again)([clip(1)])[0].tolist() == REF["ids_alone_1"].tolist()


def test_stage1_continues_from_the_released_tokenizer(prepared, export, tmp_path):
    """init_from the released folder: its codebook seeds the EMA state, the VQ is on from step 1, the export records
    the source and goes back to the released layout."""
    from datamodules.tokenizer import TokenizerDataModule
    from lit_keomni.checkpoints import Export
    from lit_keomni.stages.tokenizer import SpeechTokenizer

    L.seed_everything(0)
    model = SpeechTokenizer(init_from=str(GOLDEN), export_dir=str(tmp_path / "export"), warmup_steps=1)
    model.configure_model()
    q = model.model.encoder.quantizer
    codebook = load_file(str(GOLDEN / "model.safetensors"))["model.encoder.codebook.weight"]
    assert torch.equal(q.codebook, codebook) and torch.equal(q.embed_sum, codebook) and bool(q.initialized)
    assert model.model.encoder.use_vq
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=1,
                        callbacks=[Export()], default_root_dir=str(tmp_path))
    trainer.fit(model, TokenizerDataModule(data_dir=str(prepared), batch_size=2, num_workers=0))
    assert not torch.equal(q.codebook, codebook)  # the EMA moved it
    meta = read_export_meta(tmp_path / "export", "speech_tokenizer")
    assert meta["weights_source"]["format"] == "glm4voice-tokenizer" and meta["vq_active"]
    back = release(tmp_path / "export", tmp_path / "released")
    a, b = load_file(str(GOLDEN / "model.safetensors")), load_file(str(back / "model.safetensors"))
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)
    assert torch.equal(b["model.encoder.codebook.weight"], q.codebook)
    # a stage-1 export of it is an init_from too (the import, then stage 1)
    again = SpeechTokenizer(init_from=str(export), export_dir=None)
    again.configure_model()
    assert torch.equal(again.model.encoder.quantizer.codebook, codebook)


def _copy(tmp_path: Path) -> Path:
    folder = tmp_path / "tok"
    shutil.copytree(GOLDEN, folder)
    return folder


def _edit_config(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("changes, message", [
    ({"pooling_position": 1}, r"config.json: field 'pooling_position' is 1, but 'quantize_position' is 2"),
    ({"pooling_type": "max"}, r"config.json: field 'pooling_type' is 'max'"),
    ({"quantize_causal_encoder": True}, r"config.json: field 'quantize_causal_encoder' is True"),
    ({"encoder_layers": 5}, r"model.safetensors: weight 'model.encoder.layers.4.*' missing"),
    ({"quantize_vocab_size": None, "architectures": ["WhisperForConditionalGeneration"]},
     r"config.json: field 'architectures' .* expected GLM-4-Voice's speech tokenizer"),
])
def test_a_wrong_folder_is_one_error(tmp_path, changes, message):
    folder = _copy(tmp_path)
    _edit_config(folder, **changes)
    with pytest.raises(SystemExit, match=message):
        main(["import", "glm4voice-tokenizer", str(folder), "--out", str(tmp_path / "out")])


def test_missing_weight_and_missing_vocabulary_are_named(tmp_path):
    folder = _copy(tmp_path)
    state = load_file(str(folder / "model.safetensors"))
    del state["model.encoder.embed_positions2.weight"]
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(SystemExit, match=r"model.safetensors: weight 'model.encoder.embed_positions2.weight' missing"):
        main(["import", "glm4voice-tokenizer", str(folder), "--out", str(tmp_path / "out")])
    folder = _copy(tmp_path / "b")
    (folder / "tokenizer.json").unlink()
    with pytest.raises(SystemExit, match=r"tokenizer.json: missing; .*--tokenizer"):
        main(["import", "glm4voice-tokenizer", str(folder), "--out", str(tmp_path / "out")])
    out = import_speech_tokenizer(folder, tmp_path / "out", tokenizer=GOLDEN / "tokenizer.json")
    assert SpeechTokenEncoder(out)([clip(0)])[0].tolist() == REF["ids_alone_0"].tolist()


# A glm-4-voice-tokenizer config.json: whisper-large-v3's sizes plus the pooling / quantize fields that set the
# released network (seed 003 §2.1: 12.5 Hz, 16,384 codes after encoder layer 16 of 32); the loss and EMA fields do not
# change its size.
RELEASED_CONFIG = {
    "architectures": ["WhisperVQForConditionalGeneration"], "model_type": "whisper", "activation_function": "gelu",
    "d_model": 1280, "encoder_layers": 32, "decoder_layers": 32, "encoder_attention_heads": 20,
    "decoder_attention_heads": 20, "encoder_ffn_dim": 5120, "decoder_ffn_dim": 5120, "num_mel_bins": 128,
    "vocab_size": 51866, "max_source_positions": 1500, "max_target_positions": 448, "scale_embedding": False,
    "pooling_kernel_size": 4, "pooling_type": "avg", "pooling_position": 16, "quantize_vocab_size": 16384,
    "quantize_position": 16, "quantize_commit_coefficient": 0.25, "quantize_loss_scale": 10.0,
    "quantize_ema_decay": 0.99, "quantize_restart_interval": 100, "quantize_encoder_only": False,
    "quantize_causal_encoder": False, "quantize_causal_block_size": 200, "encoder_causal_attention": False,
    "encoder_causal_convolution": True,
}
WHISPER_LARGE_V3 = 1_543_490_560  # openai/whisper-large-v3, proj_out tied to the decoder embedding


def test_released_size_on_the_meta_device():
    """The released tokenizer is whisper-large-v3 plus the codebook and the post-VQ position table: our network from
    its config.json holds exactly that many weights (our CTC head aside; the encoder's position table and the
    codebook are buffers here, parameters there)."""
    from lit_keomni.layouts.glm4voice_tokenizer import config_from_released
    from lit_keomni.nn.whisper import SpeechTokenizerModel

    config = config_from_released(RELEASED_CONFIG)
    assert (config.frame_rate_hz, config.block_frames, config.vq_position) == (12.5, 200, 16)
    with torch.device("meta"):
        model = SpeechTokenizerModel(config)
    ours = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("ctc_head."))
    buffers = model.encoder.embed_positions.weight.numel() + model.encoder.quantizer.codebook.numel()
    assert ours + buffers == WHISPER_LARGE_V3 + 16384 * 1280 + 375 * 1280
