"""Golden files for GLM-4-Voice's speech tokenizer (glm-4-voice-tokenizer): tests/golden/glm4voice_tokenizer/.

Made by the reference code, never by ours: THUDM/GLM-4-Voice ``speech_tokenizer/`` (``configuration_whisper.py``,
``modeling_whisper.py``, ``utils.py``) at commit eb00ce9 of github.com/THUDM/GLM-4-Voice, run on CPU. Run by hand,
outside the project environment (the reference needs transformers 4.44):

    python -m venv --system-site-packages /tmp/ref/venv
    /tmp/ref/venv/bin/pip install transformers==4.44.2
    git clone https://github.com/THUDM/GLM-4-Voice /tmp/ref/glm4voice   # (or any copy of speech_tokenizer/)
    /tmp/ref/venv/bin/python tests/golden/make_glm4voice_tokenizer.py /tmp/ref/glm4voice tests/golden/glm4voice_tokenizer

What runs unchanged: ``WhisperVQForConditionalGeneration`` (built tiny and random, saved with ``save_pretrained``: the
released layout), ``load_quantize_encoder`` and ``extract_speech_token`` (the reference's tokenize, called on each
clip alone and on all clips in one call), and the model's forward for ASR logits. Only the device is changed:
``.cuda()`` is the identity and the feature extractor runs on "cpu"; torchaudio (used by the reference only to read
files and resample, neither needed for 16 kHz arrays) is a stand-in module, since no torchaudio build matches the
installed torch.

The tiny config keeps the released tokenizer's options (128 mel bins, causal convolutions, block-causal attention,
average pooling by 4 with the VQ after the same layer, EMA codebook, 30 s windows of 1,500 positions) with a 0.8 s
block so that short clips see the mask. The clips are synthetic (tones and noise, FLAC, lossless): 1.37 s, 3.05 s
and 31 s (two 30 s windows).

Files: config.json, model.safetensors, preprocessor_config.json (the released folder), tokenizer.json (a word-level
ASR vocabulary of the config's size), clip_{0,1,2}.flac, reference.safetensors (ids_alone_i, ids_batch_i: the
tokens of clip i from extract_speech_token alone and in one call with the others; mel_0: the extractor's features of
clip 0; decoder_ids, logits_0, logits_1: the full model's ASR logits of clips 0 and 1 for fixed decoder ids).
"""

import importlib.machinery
import json
import sys
import types
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from safetensors.torch import save_file

SR = 16_000


def _reference(root: Path):
    stub = types.ModuleType("torchaudio")
    stub.__spec__ = importlib.machinery.ModuleSpec("torchaudio", None)
    stub.transforms = types.SimpleNamespace(Resample=None)
    sys.modules["torchaudio"] = stub
    sys.path.insert(0, str(root))
    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.nn.Module.cuda = lambda self, *a, **k: self
    from transformers import BatchFeature, WhisperFeatureExtractor

    call = WhisperFeatureExtractor.__call__
    WhisperFeatureExtractor.__call__ = lambda self, *a, **k: call(self, *a, **{**k, "device": "cpu"})
    to = BatchFeature.to
    BatchFeature.to = lambda self, *a, **k: to(self, *a, **{**k, **({"device": "cpu"} if "device" in k else {})})
    from speech_tokenizer.configuration_whisper import WhisperVQConfig
    from speech_tokenizer.modeling_whisper import WhisperVQForConditionalGeneration
    from speech_tokenizer.utils import extract_speech_token, load_quantize_encoder

    return WhisperVQConfig, WhisperVQForConditionalGeneration, extract_speech_token, load_quantize_encoder, \
        WhisperFeatureExtractor


def _clip(seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(round(seconds * SR))) / SR
    f0 = 120 + 80 * np.sin(2 * np.pi * 0.7 * t + seed)
    tone = sum(np.sin(2 * np.pi * k * np.cumsum(f0) / SR) / k for k in range(1, 6))
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 2.3 * t) ** 2
    x = 0.2 * tone * envelope + 0.02 * rng.standard_normal(len(t))
    return (x / np.abs(x).max() * 0.6).astype(np.float32)


def _vocabulary(size: int, out: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<|endoftext|>": 0, "<unk>": 1, **{f"w{i}": i for i in range(2, size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(out / "tokenizer.json"))


def main(root: str, out_dir: str) -> None:
    Config, Model, extract_speech_token, load_quantize_encoder, FeatureExtractor = _reference(Path(root))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = Config(
        num_mel_bins=128, d_model=32, encoder_layers=4, decoder_layers=2, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=96, max_source_positions=1500,
        max_target_positions=32, pad_token_id=0, bos_token_id=0, eos_token_id=0, decoder_start_token_id=0,
        pooling_kernel_size=4, pooling_type="avg", pooling_position=2, quantize_vocab_size=64, quantize_position=2,
        quantize_commit_coefficient=0.25, quantize_loss_scale=10.0, quantize_ema_decay=0.99,
        quantize_restart_interval=100, quantize_encoder_only=False, quantize_causal_encoder=False,
        quantize_causal_block_size=40, encoder_causal_attention=False, encoder_causal_convolution=True,
        skip_language_detection=True, torch_dtype="float32",
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = Model(config).eval()
    with torch.no_grad():  # every tensor random, a codebook where the pooled features lie
        for name, p in model.named_parameters():
            if "embed_positions" in name:
                continue
            if name.endswith("layer_norm.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith("codebook.weight"):
                continue
            else:
                p.normal_(0.0, 0.15)
    FeatureExtractor(feature_size=128).save_pretrained(out)
    fe = FeatureExtractor.from_pretrained(out)
    clips = [_clip(1.37, 1), _clip(3.05, 2), np.concatenate([_clip(15.0, 3), _clip(16.0, 4)])]
    for i, c in enumerate(clips):
        sf.write(out / f"clip_{i}.flac", c, SR, subtype="PCM_16")
    clips = [torch.from_numpy(sf.read(out / f"clip_{i}.flac", dtype="float32")[0])[None] for i in range(len(clips))]

    # the codebook: pooled pre-VQ features of the clips (so codes vary), taken from the reference's own encoder
    with torch.no_grad():
        feats = fe([c[0].numpy() for c in clips[:2]], sampling_rate=SR, return_attention_mask=True,
                   return_tensors="pt", padding="longest", pad_to_multiple_of=1280)
        enc = model.model.encoder
        vq_vocab, enc.config.quantize_vocab_size = enc.config.quantize_vocab_size, None
        hidden = enc(feats.input_features, attention_mask=feats.attention_mask, output_hidden_states=True)
        enc.config.quantize_vocab_size = vq_vocab
        pooled = hidden.hidden_states[2]  # the input of layer 2: pooled after layer 1, as the VQ sees it
        rows = pooled.reshape(-1, pooled.shape[-1])
        pick = torch.randperm(rows.shape[0], generator=torch.Generator().manual_seed(5))[:64]
        enc.codebook.weight.copy_(rows[pick] + 0.05 * torch.randn(64, rows.shape[1]))
        enc.ema_weight.copy_(enc.codebook.weight)
    model.save_pretrained(out, safe_serialization=True)
    (out / "generation_config.json").unlink(missing_ok=True)
    _vocabulary(config.vocab_size, out)

    encoder = load_quantize_encoder(str(out))
    tensors = {}
    batch = extract_speech_token(encoder, fe, [(c, SR) for c in clips])
    for i, c in enumerate(clips):
        tensors[f"ids_alone_{i}"] = torch.tensor(extract_speech_token(encoder, fe, [(c, SR)])[0])
        tensors[f"ids_batch_{i}"] = torch.tensor(batch[i])
        print(f"clip {i}: {c.shape[-1] / SR:.2f} s, {len(tensors[f'ids_alone_{i}'])} tokens, alone == batch: "
              f"{torch.equal(tensors[f'ids_alone_{i}'], tensors[f'ids_batch_{i}'])}, "
              f"{len(set(tensors[f'ids_alone_{i}'].tolist()))} distinct codes")
    f0 = fe(clips[0][0].numpy(), sampling_rate=SR, return_attention_mask=True, return_tensors="pt",
            padding="longest", pad_to_multiple_of=1280)
    tensors["mel_0"] = f0.input_features[0].contiguous()
    tensors["decoder_ids"] = torch.tensor([[0, 5, 17, 42, 8, 77, 3]])
    full = Model.from_pretrained(out).eval()
    with torch.no_grad():
        for i in (0, 1):
            f = fe(clips[i][0].numpy(), sampling_rate=SR, return_attention_mask=True, return_tensors="pt",
                   padding="longest", pad_to_multiple_of=1280)
            logits = full(input_features=f.input_features, attention_mask=f.attention_mask,
                          decoder_input_ids=tensors["decoder_ids"]).logits
            tensors[f"logits_{i}"] = logits.float().contiguous()
    save_file(tensors, str(out / "reference.safetensors"))
    print(json.dumps({p.name: p.stat().st_size for p in sorted(out.iterdir())}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
