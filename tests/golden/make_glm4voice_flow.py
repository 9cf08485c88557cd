"""Golden files for GLM-4-Voice's flow-matching speech decoder (the ``flow`` of glm-4-voice-decoder):
tests/golden/glm4voice_flow/.

Made by the reference code, never by ours: THUDM/GLM-4-Voice at commit eb00ce9142e8d98b0ed7c57cd47e0d6d5dce9a1a
(``cosyvoice/flow/flow.py`` MaskedDiffWithXvec, ``flow_matching.py`` ConditionalCFM, ``decoder.py``
ConditionalDecoder, ``length_regulator.py``, ``cosyvoice/transformer/*`` BlockConformerEncoder) with its submodule
shivammehta25/Matcha-TTS at commit dd9105b34bf2be2230f4aa1e4769fb586a3c824e (``matcha/models/components/decoder.py``,
``transformer.py``, ``flow_matching.py``), diffusers 0.27.2 (the version GLM-4-Voice's requirements.txt pins), run
on CPU in float32 (HyperPyYAML 1.2.2 needs a ruamel.yaml before 0.18). Run by hand, outside the project
environment:

    python -m venv --system-site-packages /tmp/ref16/venv
    /tmp/ref16/venv/bin/pip install diffusers==0.27.2 "huggingface_hub<0.26" transformers==4.44.2 \
        omegaconf==2.3.0 conformer==0.3.2 HyperPyYAML==1.2.2 ruamel.yaml==0.17.40
    git clone https://github.com/THUDM/GLM-4-Voice /tmp/ref16/glm4voice        # then check out eb00ce9
    git clone https://github.com/shivammehta25/Matcha-TTS /tmp/ref16/glm4voice/third_party/Matcha-TTS   # dd9105b
    OMP_NUM_THREADS=1 /tmp/ref16/venv/bin/python tests/golden/make_glm4voice_flow.py /tmp/ref16/glm4voice \
        tests/golden/glm4voice_flow

What runs unchanged: ``hyperpyyaml.load_hyperpyyaml`` on config.yaml (the released glm-4-voice-decoder config.yaml
with every option kept and only the sizes made tiny: 16 mel bins, a 40-token vocabulary, a 2-layer block encoder
with 3-token blocks, a [16, 16]-channel estimator; its HiFT section tiny too), which builds the reference
MaskedDiffWithXvec; ``flow.forward`` (the training loss), ``flow.inference`` (as flow_inference.py calls it: 10 Euler
steps, classifier-free guidance 0.7, noise from ``torch.manual_seed(42)``), ``flow.decoder(...)`` (ConditionalCFM's
sampler), and the encoder, length regulator and estimator modules. One stand-in: ``matcha.utils`` (whose package
``__init__`` imports hydra, gdown, wget and matplotlib for Matcha's training scripts) is replaced by a module holding
only ``pylogger.get_pylogger`` (= ``logging.getLogger``), the one name the flow code takes from it. Every parameter is
moved off its initial value by N(0, 0.1) noise (seeded) so that norms and biases are not trivially 1 and 0.

Files: config.yaml, flow.pt (``torch.save(flow.state_dict())``, the released layout), reference.safetensors:
- ``enc_tokens`` (2, 11; row 1 padded with -1 after 7), ``enc_lengths``, ``h`` (encoder output), ``feat_lengths``,
  ``mu`` (encoder_proj + length regulator to ``feat_lengths`` frames, (2, 30, 16));
- ``est_x``, ``est_mask``, ``est_mu``, ``est_t``, ``est_spks``, ``est_cond`` and ``est_out`` (the estimator's vector
  field on them);
- ``loss_feat``, ``loss_embedding``, ``loss_prompt``, ``loss_t`` (after the cosine schedule), ``loss_noise``,
  ``loss_keep`` (1 where the conditions survive the CFG dropout) and ``loss`` (``flow.forward``'s loss; the random
  draws were recorded by replaying python's and torch's generators from the same seeds, and checked here);
- ``inf_tokens`` (1, 11) and ``inf_mel`` (``flow.inference`` with an empty prompt and a zero speaker embedding);
  ``inf_prompt_tokens`` (1, 5), ``inf_prompt_mel`` (1, 34, 16), ``inf_embedding`` and ``inf_mel_prompt`` (with them);
- ``cfm_mu``, ``cfm_mask``, ``cfm_spks``, ``cfm_cond`` and ``cfm_out`` (``flow.decoder`` with 3 steps, temperature 0.5).
"""

import logging
import random
import sys
import types
from pathlib import Path

import torch
from safetensors.torch import save_file

GLM4VOICE_COMMIT = "eb00ce9142e8d98b0ed7c57cd47e0d6d5dce9a1a"
MATCHA_COMMIT = "dd9105b34bf2be2230f4aa1e4769fb586a3c824e"

CONFIG_YAML = """\
# set random seed, so that you may reproduce your result.
__set_seed1: !apply:random.seed [1986]
__set_seed2: !apply:numpy.random.seed [1986]
__set_seed3: !apply:torch.manual_seed [1986]
__set_seed4: !apply:torch.cuda.manual_seed_all [1986]

# fixed params
sample_rate: 22050
spk_embed_dim: 12

# glm-4-voice-decoder's config.yaml with tiny sizes (every option as released)
flow: !new:cosyvoice.flow.flow.MaskedDiffWithXvec
    input_size: 24
    output_size: 16
    spk_embed_dim: !ref <spk_embed_dim>
    output_type: 'mel'
    vocab_size: 40
    input_frame_rate: 12.5
    only_mask_loss: True
    encoder: !new:cosyvoice.transformer.encoder.BlockConformerEncoder
        output_size: 32
        attention_heads: 2
        linear_units: 48
        num_blocks: 2
        dropout_rate: 0.1
        positional_dropout_rate: 0.1
        attention_dropout_rate: 0.1
        normalize_before: True
        input_layer: 'linear'
        pos_enc_layer_type: 'rel_pos_espnet'
        selfattention_layer_type: 'block_rel_selfattn'
        block_size: 3
        input_size: 24
        use_cnn_module: False
        macaron_style: False
    length_regulator: !new:cosyvoice.flow.length_regulator.InterpolateRegulator
        channels: 16
        sampling_ratios: [1, 1, 1, 1]
    decoder: !new:cosyvoice.flow.flow_matching.ConditionalCFM
        in_channels: 48
        n_spks: 1
        spk_emb_dim: 16
        cfm_params: !new:omegaconf.DictConfig
            content:
                sigma_min: 1e-06
                solver: 'euler'
                t_scheduler: 'cosine'
                training_cfg_rate: 0.2
                inference_cfg_rate: 0.7
                reg_loss_type: 'l1'
        estimator: !new:cosyvoice.flow.decoder.ConditionalDecoder
            in_channels: 64
            out_channels: 16
            channels: [16, 16]
            dropout: 0
            attention_head_dim: 8
            n_blocks: 1
            num_mid_blocks: 2
            num_heads: 2
            act_fn: 'gelu'

hift: !new:cosyvoice.hifigan.generator.HiFTGenerator
    in_channels: 16
    base_channels: 16
    nb_harmonics: 8
    sampling_rate: !ref <sample_rate>
    nsf_alpha: 0.1
    nsf_sigma: 0.003
    nsf_voiced_threshold: 10
    upsample_rates: [8, 8]
    upsample_kernel_sizes: [16, 16]
    istft_params:
        n_fft: 16
        hop_len: 4
    resblock_kernel_sizes: [3, 7, 11]
    resblock_dilation_sizes: [[1, 3, 5], [1, 3, 5], [1, 3, 5]]
    source_resblock_kernel_sizes: [7, 11]
    source_resblock_dilation_sizes: [[1, 3, 5], [1, 3, 5]]
    lrelu_slope: 0.1
    audio_limit: 0.99
    f0_predictor: !new:cosyvoice.hifigan.f0_predictor.ConvRNNF0Predictor
        num_class: 1
        in_channels: 16
        cond_channels: 16
"""


def _reference(root: Path) -> None:
    sys.path[:0] = [str(root), str(root / "third_party" / "Matcha-TTS")]
    utils = types.ModuleType("matcha.utils")
    utils.__path__ = []
    pylogger = types.ModuleType("matcha.utils.pylogger")
    pylogger.get_pylogger = logging.getLogger
    utils.pylogger = pylogger
    sys.modules["matcha.utils"], sys.modules["matcha.utils.pylogger"] = utils, pylogger


def _pad_mask(lengths: torch.Tensor, T: int) -> torch.Tensor:
    return (torch.arange(T)[None] < lengths[:, None]).float()


def main(root: str, out: str) -> None:
    torch.set_num_threads(1)
    _reference(Path(root))
    from hyperpyyaml import load_hyperpyyaml

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(CONFIG_YAML, encoding="utf-8")
    with open(out / "config.yaml") as f:
        configs = load_hyperpyyaml(f)
    flow = configs["flow"].eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    state = {k: v.contiguous() for k, v in flow.state_dict().items()}
    torch.save(state, out / "flow.pt")
    ref: dict[str, torch.Tensor] = {}
    n_mels, vocab = flow.output_size, flow.vocab_size

    # encoder and length regulator on a padded batch
    tokens = torch.randint(0, vocab, (2, 11), generator=g)
    lengths = torch.tensor([11, 7])
    tokens[1, 7:] = -1
    feat_lengths = torch.tensor([30, 19])
    with torch.no_grad():
        emb = flow.input_embedding(torch.clamp(tokens, min=0)) * _pad_mask(lengths, 11)[..., None]
        h, _ = flow.encoder(emb, lengths)
        mu, _ = flow.length_regulator(flow.encoder_proj(h), feat_lengths)
    ref.update(enc_tokens=tokens, enc_lengths=lengths, h=h, feat_lengths=feat_lengths, mu=mu)

    # the estimator on a padded batch
    T = 30
    x = torch.randn(2, n_mels, T, generator=g)
    mask = _pad_mask(feat_lengths, T)[:, None]
    est_t = torch.tensor([0.3, 0.8])
    spks = torch.randn(2, n_mels, generator=g)
    cond = torch.randn(2, n_mels, T, generator=g) * mask
    with torch.no_grad():
        est = flow.decoder.estimator(x, mask, mu.transpose(1, 2), est_t, spks, cond)
    ref.update(est_x=x, est_mask=mask, est_mu=mu.transpose(1, 2).contiguous(), est_t=est_t, est_spks=spks,
               est_cond=cond, est_out=est)

    # the training loss, with its random draws replayed from the same seeds
    feat = torch.randn(2, T, n_mels, generator=g) * _pad_mask(feat_lengths, T)[..., None]
    embedding = torch.randn(2, flow.spk_embed_affine_layer.in_features, generator=g)
    batch = {"speech_token": tokens, "speech_token_len": lengths, "speech_feat": feat,
             "speech_feat_len": feat_lengths, "embedding": embedding}
    for seed in range(100):  # a seed where one row keeps a prompt and one row loses its conditions
        random.seed(seed)
        prompt = [0 if random.random() < 0.5 else random.randint(0, int(0.8 * j)) for j in feat_lengths.tolist()]
        torch.manual_seed(seed)
        t = torch.rand([2, 1, 1])
        t = 1 - torch.cos(t * 0.5 * torch.pi)
        z = torch.randn(2, n_mels, T)
        keep = torch.rand(2) > flow.decoder.training_cfg_rate
        if sorted(keep.tolist()) == [False, True] and max(prompt) > 0:
            break
    random.seed(seed)
    torch.manual_seed(seed)
    with torch.no_grad():
        loss = flow(batch, torch.device("cpu"))["loss"]
        # check the replay: the same loss from the recorded draws
        e = flow.spk_embed_affine_layer(torch.nn.functional.normalize(embedding, dim=1))
        conds = torch.zeros(feat.shape)
        for i, j in enumerate(prompt):
            conds[i, :j] = feat[i, :j]
        x1, m = feat.transpose(1, 2), _pad_mask(feat_lengths, T)[:, None]
        sigma = flow.decoder.sigma_min
        y = (1 - (1 - sigma) * t) * z + t * x1
        u = x1 - (1 - sigma) * z
        k = keep.float()
        pred = flow.decoder.estimator(y, m, mu.transpose(1, 2) * k[:, None, None], t.squeeze(), e * k[:, None],
                                      conds.transpose(1, 2) * k[:, None, None])
        again = torch.nn.functional.mse_loss(pred * m, u * m, reduction="sum") / (m.sum() * u.shape[1])
    assert torch.allclose(loss, again, atol=1e-6, rtol=0), (loss, again)
    ref.update(loss_feat=feat, loss_embedding=embedding, loss_prompt=torch.tensor(prompt), loss_t=t.flatten(),
               loss_noise=z, loss_keep=keep.to(torch.uint8), loss=loss)

    # inference as flow_inference.py calls it: empty prompt, zero speaker embedding; then with a prompt
    inf_tokens = torch.randint(0, vocab, (1, 11), generator=g, dtype=torch.int32)
    zeros_emb = torch.zeros(1, flow.spk_embed_affine_layer.in_features)
    empty_tok, empty_feat = torch.zeros(1, 0, dtype=torch.int32), torch.zeros(1, 0, n_mels)

    def infer(tok, ptok, pfeat, emb):
        return flow.inference(token=tok, token_len=torch.tensor([tok.shape[1]], dtype=torch.int32),
                              prompt_token=ptok, prompt_token_len=torch.tensor([ptok.shape[1]], dtype=torch.int32),
                              prompt_feat=pfeat, prompt_feat_len=torch.tensor([pfeat.shape[1]], dtype=torch.int32),
                              embedding=emb)

    ref["inf_tokens"], ref["inf_mel"] = inf_tokens, infer(inf_tokens, empty_tok, empty_feat, zeros_emb).clone()
    prompt_tokens = torch.randint(0, vocab, (1, 5), generator=g, dtype=torch.int32)
    prompt_frames = int(5 / flow.input_frame_rate * 22050 / 256)
    prompt_mel = torch.randn(1, prompt_frames, n_mels, generator=g)
    inf_emb = torch.randn(1, zeros_emb.shape[1], generator=g)
    ref.update(inf_prompt_tokens=prompt_tokens, inf_prompt_mel=prompt_mel, inf_embedding=inf_emb,
               inf_mel_prompt=infer(inf_tokens, prompt_tokens, prompt_mel, inf_emb).clone())

    # ConditionalCFM's sampler with other settings
    cfm_mu = mu[:1].transpose(1, 2).contiguous()
    cfm_mask = torch.ones(1, 1, T)
    cfm_spks = torch.randn(1, n_mels, generator=g)
    cfm_cond = torch.zeros(1, n_mels, T)
    cfm_cond[..., :8] = torch.randn(1, n_mels, 8, generator=g)
    out_cfm = flow.decoder(mu=cfm_mu, mask=cfm_mask, n_timesteps=3, temperature=0.5, spks=cfm_spks, cond=cfm_cond)
    ref.update(cfm_mu=cfm_mu, cfm_mask=cfm_mask, cfm_spks=cfm_spks, cfm_cond=cfm_cond, cfm_out=out_cfm.clone())

    save_file({k: v.detach().contiguous() for k, v in ref.items()}, str(out / "reference.safetensors"),
              metadata={"glm4voice_commit": GLM4VOICE_COMMIT, "matcha_commit": MATCHA_COMMIT,
                        "diffusers": __import__("diffusers").__version__, "loss_seed": str(seed)})
    params = sum(v.numel() for v in state.values())
    print(f"wrote {out}: {params} flow parameters, loss {loss.item():.6f} (seed {seed}), "
          f"inference mel {tuple(ref['inf_mel'].shape)} / {tuple(ref['inf_mel_prompt'].shape)}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
