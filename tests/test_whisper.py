"""Encoder/decoder parity with Hugging Face Whisper, and the streaming properties of the stem and attention."""

import pytest
import torch

from lit_keomni.checkpoints import check_hf_whisper_config, read_hf_folder, whisper_from_hf, whisper_to_hf
from lit_keomni.configs import SpeechTokenizerConfig
from lit_keomni.nn.whisper import SpeechTokenizerModel

transformers = pytest.importorskip("transformers")


def tiny(**kw) -> SpeechTokenizerConfig:
    base = dict(d_model=64, n_head=4, ffn_dim=128, encoder_layers=3, vq_position=1, decoder_layers=2, vocab_size=100,
                max_source_positions=50, max_target_positions=32, codebook_size=32)
    return SpeechTokenizerConfig(**{**base, **kw})


@pytest.mark.parametrize("n_mels", [80, 128])
def test_parity_with_transformers_whisper(tmp_path, n_mels):
    torch.manual_seed(0)
    hf_cfg = transformers.WhisperConfig(
        d_model=64, encoder_layers=3, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=128, decoder_ffn_dim=128, num_mel_bins=n_mels, vocab_size=100, max_source_positions=50,
        max_target_positions=32, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
    )
    hf = transformers.WhisperForConditionalGeneration(hf_cfg).eval()
    hf.save_pretrained(tmp_path)  # safetensors, as a user's local folder would hold
    config, state = read_hf_folder(tmp_path)
    ours_cfg = tiny(n_mels=n_mels, causal_conv=False, block_seconds=None, pool=1, vq=False)
    check_hf_whisper_config(config, ours_cfg.to_dict(), "hf")
    ours = SpeechTokenizerModel(ours_cfg).eval()
    missing, unexpected = ours.load_state_dict(whisper_from_hf(state), strict=False)
    assert not unexpected and all(k.startswith("ctc_head.") for k in missing)

    mel = torch.randn(2, n_mels, 100)
    tokens = torch.randint(3, 100, (2, 7))
    with torch.no_grad():
        ref = hf(input_features=mel, decoder_input_ids=tokens)
        ref_enc = hf.model.encoder(mel).last_hidden_state
        logits, enc = ours(mel, torch.tensor([100, 100]), tokens)
    torch.testing.assert_close(enc.hidden, ref_enc, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits, ref.logits, atol=1e-4, rtol=1e-4)
    # and back: our weights load into transformers under its own names
    back = transformers.WhisperModel(hf_cfg)
    missing, unexpected = back.load_state_dict(whisper_to_hf(ours.state_dict()), strict=False)
    assert not unexpected and not missing


def test_config_mismatch_names_the_field():
    with pytest.raises(ValueError, match="encoder_layers"):
        check_hf_whisper_config({"encoder_layers": 32}, tiny().to_dict(), "w/config.json")


@pytest.mark.parametrize("pool", [1, 2, 4])
def test_block_causal_encoder_ignores_future_blocks(pool):
    """Perturbing audio after a block boundary leaves every earlier token and state unchanged."""
    torch.manual_seed(0)
    cfg = tiny(block_seconds=0.32, pool=pool)  # 16 frames at 50 Hz per block
    model = SpeechTokenizerModel(cfg).eval()
    model.encoder.quantizer.init_codebook(torch.randn(32, 64))
    mel = torch.randn(1, 80, 96)  # 48 frames at 50 Hz = 3 blocks
    later = mel.clone()
    later[..., 64:] += torch.randn_like(later[..., 64:])  # change the third block only (mel frames 64.. -> 50 Hz 32..)
    lengths = torch.tensor([96])
    with torch.no_grad():
        a, b = model.encoder(mel, lengths), model.encoder(later, lengths)
    keep = 32 // pool  # token frames in the first two blocks
    torch.testing.assert_close(a.hidden[:, :keep], b.hidden[:, :keep])
    assert torch.equal(a.codes[:, :keep], b.codes[:, :keep])
    assert not torch.allclose(a.hidden[:, keep:], b.hidden[:, keep:])


def test_causal_stem_and_bidirectional_contrast():
    torch.manual_seed(0)
    mel = torch.randn(1, 80, 64)
    later = mel.clone()
    later[..., 40:] += 1.0
    lengths = torch.tensor([64])
    causal = SpeechTokenizerModel(tiny(block_seconds=None, pool=1, vq=False, causal_conv=True)).eval()
    stem_a, _ = causal.encoder._stem(mel, lengths)
    stem_b, _ = causal.encoder._stem(later, lengths)
    torch.testing.assert_close(stem_a[:, :20], stem_b[:, :20])  # mel frame 40 is 50 Hz frame 20
    bidir = SpeechTokenizerModel(tiny(block_seconds=None, pool=1, vq=False, causal_conv=False)).eval()
    with torch.no_grad():
        ha, hb = bidir.encoder(mel, lengths).hidden, bidir.encoder(later, lengths).hidden
    assert not torch.allclose(ha[:, :10], hb[:, :10])  # without block causality the past sees the future


def test_padding_does_not_change_valid_outputs():
    torch.manual_seed(0)
    model = SpeechTokenizerModel(tiny(block_seconds=0.32, pool=4, max_source_positions=100)).eval()
    model.encoder.quantizer.init_codebook(torch.randn(32, 64))
    mel = torch.randn(1, 80, 80)
    padded = torch.cat([mel, torch.randn(1, 80, 40)], dim=2)
    with torch.no_grad():
        a = model.encoder(mel, torch.tensor([80]))
        b = model.encoder(padded, torch.tensor([80]))
    n = int(a.lengths[0])
    assert int(b.lengths[0]) == n
    torch.testing.assert_close(a.hidden[:, :n], b.hidden[:, :n], atol=1e-5, rtol=1e-5)
    assert torch.equal(a.codes[:, :n], b.codes[:, :n])


def test_block_must_align_with_pooling():
    with pytest.raises(ValueError, match="multiple of pool"):
        tiny(block_seconds=0.1, pool=4)  # 5 frames


def test_cached_greedy_decoding_equals_recomputing_the_prefix():
    """The decoder's key/value cache gives each step the logits of the whole prefix's last row, so greedy decoding
    picks the same tokens as re-running the decoder on the prefix every step."""
    torch.manual_seed(0)
    cfg = SpeechTokenizerConfig.from_name("tiny", d_model=64, n_head=4, ffn_dim=128, encoder_layers=2, vq_position=1,
                                          decoder_layers=2, vocab_size=40, vq=False)
    model = SpeechTokenizerModel(cfg).double().eval()  # float64: the comparison is exact up to rounding
    with torch.no_grad():
        for p in model.decoder.parameters():  # larger weights than the init, so that argmax choices vary
            p.mul_(8)
        memory, lengths = torch.randn(3, 9, 64, dtype=torch.float64), torch.tensor([9, 5, 7])
        prefix = [1, 7]
        tokens = torch.tensor(prefix).repeat(3, 1)
        caches = model.decoder.start(memory)
        model.decoder.step(tokens[:, :1], 0, caches, lengths, 9)
        for pos in range(1, 12):
            full = model.decoder(tokens, memory, lengths)[:, -1]
            step = model.decoder.step(tokens[:, -1:], pos, caches, lengths, 9)
            torch.testing.assert_close(step, full, atol=1e-9, rtol=1e-9)
            tokens = torch.cat([tokens, full.argmax(-1, keepdim=True)], dim=1)
        decoded = model.greedy_decode(memory, lengths, prefix, eos_id=0, max_tokens=11)
    expected = [row[len(prefix):] for row in tokens.tolist()]
    expected = [r[: r.index(0)] if 0 in r else r for r in expected]
    assert decoded == expected and len({tuple(r) for r in decoded}) > 1
