"""Golden files for GLM-4-Voice's mel vocoder (glm-4-voice-decoder ``hift.pt``): tests/golden/glm4voice_hift.{json,safetensors}.

Made by the reference code, never by ours: THUDM/GLM-4-Voice ``cosyvoice/hifigan/generator.py`` and
``cosyvoice/hifigan/f0_predictor.py`` at commit eb00ce9142e8d98b0ed7c57cd47e0d6d5dce9a1a of
github.com/THUDM/GLM-4-Voice, run on CPU in float32. Run by hand, outside the project environment (the reference needs
numpy, scipy and torch only):

    python -m venv --system-site-packages /tmp/ref16h/venv
    mkdir -p /tmp/ref16h/glm4voice
    git -C /path/to/GLM-4-Voice archive HEAD cosyvoice | tar -x -C /tmp/ref16h/glm4voice
    OMP_NUM_THREADS=1 /tmp/ref16h/venv/bin/python tests/golden/make_glm4voice_hift.py /tmp/ref16h/glm4voice tests/golden

What runs unchanged: ``HiFTGenerator`` with its ``ConvRNNF0Predictor`` (built as the released config.yaml's ``hift``
section builds it: 80 mel bins, 8 harmonics, 22,050 Hz, upsampling 8 x 8 with kernels 16, iSTFT n_fft 16 hop 4,
resblocks 3/7/11, source resblocks 7/11, voiced threshold 10) with small widths (``base_channels`` 16,
``cond_channels`` 16), its ``f0_predictor``, ``_f02source``, ``forward`` and ``inference``. The module is
initialised by the reference and then every parameter is redrawn from a fixed seed (weight-norm magnitudes in
[0.5, 1), Snake alphas in [0.5, 1.5), the F0 classifier scaled so that F0 spans voiced and unvoiced values), so that
the output is not the near-constant waveform of HiFi-GAN's N(0, 0.01) initialisation. Its state dict is saved as
``torch.nn.utils.weight_norm`` writes it (``weight_g`` / ``weight_v``), the form of the released ``hift.pt``.

Randomness: the reference's sine generator draws, inside ``SineGen.forward``, first the harmonics' initial phases
(``Uniform(-pi, pi).sample``, i.e. ``torch.rand`` of shape (B, harmonics + 1, 1)) and then the additive noise
(``torch.randn_like`` of shape (B, harmonics + 1, samples)) from torch's global generator. Each reference call below
is preceded by ``torch.manual_seed(SEED_i)``, and the seed is stored with its outputs, so the same draws are
reproduced by a ``torch.Generator`` seeded alike that draws the same shapes in the same order.

Files: glm4voice_hift.json (the ``hift`` section as a plain dict, with ``_class`` keys; the reference commit; the
seeds), glm4voice_hift.safetensors: ``hift.<key>`` the released-form state dict; ``mel`` (2, 80, 16) a fixed random
log-mel; ``f0`` (2, 16) the F0 predictor's output; ``source`` (2, 1, 4096) the excitation ``_f02source`` of that F0
(seed ``seed_source``); ``wav`` (2, 4096) and ``wav_source`` the output of ``forward(mel)`` (seed ``seed_forward``);
``stream_mel_1`` (1, 80, 12), ``stream_wav_1``, ``stream_source_1``: ``inference`` of a first chunk (seed
``seed_stream_1``); ``stream_mel_2`` (1, 80, 1 + 10) the second chunk after one cached mel frame, ``stream_cache``
(1, 1, 256) the last 256 source samples of the first call, and ``stream_wav_2``, ``stream_source_2``: ``inference(mel=
stream_mel_2, cache_source=stream_cache)`` (seed ``seed_stream_2``), as ``flow_inference.py`` streams.
"""

import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

SEEDS = {"seed_init": 16, "seed_params": 17, "seed_mel": 18, "seed_source": 101, "seed_forward": 102,
         "seed_stream_1": 103, "seed_stream_2": 104}

HIFT_SECTION = {
    "_class": "cosyvoice.hifigan.generator.HiFTGenerator",
    "in_channels": 80,
    "base_channels": 16,
    "nb_harmonics": 8,
    "sampling_rate": 22050,
    "nsf_alpha": 0.1,
    "nsf_sigma": 0.003,
    "nsf_voiced_threshold": 10,
    "upsample_rates": [8, 8],
    "upsample_kernel_sizes": [16, 16],
    "istft_params": {"n_fft": 16, "hop_len": 4},
    "resblock_kernel_sizes": [3, 7, 11],
    "resblock_dilation_sizes": [[1, 3, 5], [1, 3, 5], [1, 3, 5]],
    "source_resblock_kernel_sizes": [7, 11],
    "source_resblock_dilation_sizes": [[1, 3, 5], [1, 3, 5]],
    "lrelu_slope": 0.1,
    "audio_limit": 0.99,
    "f0_predictor": {"_class": "cosyvoice.hifigan.f0_predictor.ConvRNNF0Predictor", "num_class": 1,
                     "in_channels": 80, "cond_channels": 16},
}


def build(root: Path):
    sys.path.insert(0, str(root))
    from cosyvoice.hifigan.f0_predictor import ConvRNNF0Predictor
    from cosyvoice.hifigan.generator import HiFTGenerator

    kwargs = {k: v for k, v in HIFT_SECTION.items() if k not in ("_class", "f0_predictor")}
    f0_kwargs = {k: v for k, v in HIFT_SECTION["f0_predictor"].items() if k != "_class"}
    torch.manual_seed(SEEDS["seed_init"])
    model = HiFTGenerator(**kwargs, f0_predictor=ConvRNNF0Predictor(**f0_kwargs)).eval()
    g = torch.Generator().manual_seed(SEEDS["seed_params"])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("weight_g"):
                p.copy_(0.5 + 0.5 * torch.rand(p.shape, generator=g))
            elif name.endswith("alpha"):
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            elif name.startswith("f0_predictor.classifier"):
                p.copy_(600.0 * torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) / max(1, p[0].numel()) ** 0.5)
    return model


def main(root: Path, out: Path) -> None:
    model = build(root)
    state = {f"hift.{k}": v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(SEEDS["seed_mel"])
    mel = -6.0 + 2.0 * torch.randn(2, 80, 16, generator=g)
    stream_mel_1 = -6.0 + 2.0 * torch.randn(1, 80, 12, generator=g)
    next_mel = -6.0 + 2.0 * torch.randn(1, 80, 10, generator=g)
    out_t = {"mel": mel, "stream_mel_1": stream_mel_1}
    with torch.no_grad():
        out_t["f0"] = model.f0_predictor(mel)
        torch.manual_seed(SEEDS["seed_source"])
        out_t["source"] = model._f02source(out_t["f0"])
        torch.manual_seed(SEEDS["seed_forward"])
        out_t["wav"], out_t["wav_source"] = model(mel)
    torch.manual_seed(SEEDS["seed_stream_1"])
    wav_1, source_1 = model.inference(mel=stream_mel_1)
    cache = source_1[:, :, -256:].clone()  # flow_inference.py: mel_cache_len 1, source_cache_len 256
    stream_mel_2 = torch.cat([stream_mel_1[:, :, -1:], next_mel], dim=2)
    torch.manual_seed(SEEDS["seed_stream_2"])
    wav_2, source_2 = model.inference(mel=stream_mel_2, cache_source=cache)
    out_t.update(stream_wav_1=wav_1, stream_source_1=source_1, stream_mel_2=stream_mel_2, stream_cache=cache,
                 stream_wav_2=wav_2, stream_source_2=source_2)
    tensors = {**state, **{k: v.detach().clone().contiguous().float() for k, v in out_t.items()}}
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "glm4voice_hift.safetensors"))
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
    except (subprocess.CalledProcessError, FileNotFoundError):
        commit = "eb00ce9142e8d98b0ed7c57cd47e0d6d5dce9a1a"  # a `git archive` export has no .git
    meta = {"hift": HIFT_SECTION, "reference": {"repository": "github.com/THUDM/GLM-4-Voice", "commit": commit,
                                                 "files": ["cosyvoice/hifigan/generator.py",
                                                           "cosyvoice/hifigan/f0_predictor.py"]},
            "seeds": SEEDS, "torch": torch.__version__}
    (out / "glm4voice_hift.json").write_text(json.dumps(meta, indent=2) + "\n")
    print({k: tuple(v.shape) for k, v in out_t.items()})
    print("voiced fraction of f0:", float((out_t["f0"] > 10).float().mean()), "wav peak:", float(out_t["wav"].abs().max()))


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit("usage: make_glm4voice_hift.py GLM4VOICE_CHECKOUT OUT_DIR")
    main(Path(sys.argv[1]), Path(sys.argv[2]))
