"""GLM-4-Voice's flow-matching speech decoder (``nn/flow.py``, ``layouts/glm4voice_decoder.py``): parity with the
reference's encoder, estimator, loss and sampler (golden files made by THUDM's cosyvoice + Matcha-TTS code,
tests/golden/make_glm4voice_flow.py), the flow-matching loss on a known path, the ODE solvers on fields with known
solutions, classifier-free guidance, the block-causal encoder, the released layout both ways and its errors."""

import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from lit_keomni.layouts.glm4voice_decoder import (
    flow_config_from_released,
    flow_released_names,
    flow_state_from_released,
    flow_state_to_released,
    load_released_flow,
    read_decoder_config,
)
from lit_keomni.nn.flow import (
    FlowConfig,
    FlowDecoder,
    block_causal_mask,
    classifier_free_guidance,
    ode_solve,
    time_grid,
)

GOLDEN = Path(__file__).resolve().parent / "golden" / "glm4voice_flow"
REF = load_file(str(GOLDEN / "reference.safetensors"))
TOL = dict(atol=1e-5, rtol=1e-5)
SMALL = dict(vocab_size=32, token_dim=16, n_mels=8, speaker_dim=6, encoder_dim=16, encoder_heads=2, encoder_ffn_dim=32,
             encoder_layers=2, block_size=3, regulator_layers=1, estimator_channels=(8, 8), estimator_mid_levels=1,
             estimator_heads=2, estimator_head_dim=4)


@pytest.fixture(scope="module")
def golden() -> FlowDecoder:
    return load_released_flow(GOLDEN)


def small(**overrides) -> FlowDecoder:
    torch.manual_seed(0)
    return FlowDecoder(FlowConfig.from_dict({**SMALL, **overrides})).eval()


# ------------------------------------------------------------------------------------------------- golden parity


def test_golden_encoder_and_mu(golden):
    """Encoder states and the length-regulated mu of a padded batch (row 1: 7 of 11 tokens, padding -1)."""
    with torch.no_grad():
        h = golden.encode(REF["enc_tokens"], REF["enc_lengths"])
        mu = golden.condition(REF["enc_tokens"], REF["enc_lengths"], REF["feat_lengths"])
    torch.testing.assert_close(h, REF["h"], **TOL)
    torch.testing.assert_close(mu.transpose(1, 2), REF["mu"], **TOL)


def test_golden_estimator(golden):
    """The vector field on a padded batch with per-row times (the additive 0/1 attention mask included)."""
    with torch.no_grad():
        v = golden.estimator(REF["est_x"], REF["est_mask"], REF["est_mu"], REF["est_t"], REF["est_spks"],
                             REF["est_cond"])
    torch.testing.assert_close(v, REF["est_out"], **TOL)


def test_golden_loss(golden):
    """``flow.forward``'s loss, given the draws it made (prompt prefix, cosine t, noise, CFG keep)."""
    assert REF["loss_keep"].tolist() == [1, 0] and REF["loss_prompt"].max() > 0  # both branches are exercised
    with torch.no_grad():
        out = golden.loss(REF["enc_tokens"], REF["enc_lengths"], REF["loss_feat"].transpose(1, 2), REF["feat_lengths"],
                          REF["loss_embedding"], t=REF["loss_t"], noise=REF["loss_noise"],
                          prompt_frames=REF["loss_prompt"], keep=REF["loss_keep"].bool())
    torch.testing.assert_close(out["loss"], REF["loss"], **TOL)


def test_golden_inference(golden):
    """``flow.inference`` as GLM-4-Voice calls it (empty prompt, zero speaker, seed-42 noise, 10 Euler steps, CFG 0.7),
    and with a prompt and a speaker embedding: only the frames after the prompt come back."""
    mel = golden.inference(REF["inf_tokens"])
    assert mel.shape == REF["inf_mel"].shape == (1, 16, 75)
    torch.testing.assert_close(mel, REF["inf_mel"], **TOL)
    mel = golden.inference(REF["inf_tokens"], prompt_tokens=REF["inf_prompt_tokens"],
                           prompt_mel=REF["inf_prompt_mel"].transpose(1, 2), speaker=REF["inf_embedding"])
    assert mel.shape == REF["inf_mel_prompt"].shape == (1, 16, 110 - 34)
    torch.testing.assert_close(mel, REF["inf_mel_prompt"], **TOL)


def test_golden_sampler(golden):
    """ConditionalCFM's sampler with 3 steps and temperature 0.5."""
    x = golden.sample(REF["cfm_mu"], REF["cfm_mask"], REF["cfm_spks"], REF["cfm_cond"], n_timesteps=3,
                      temperature=0.5)
    torch.testing.assert_close(x, REF["cfm_out"], **TOL)


# -------------------------------------------------------------------------------------------------- behaviour


class Recorder(torch.nn.Module):
    """A stand-in estimator: records its inputs and returns a fixed function of them."""

    def forward(self, x, mask, mu, t, spks, cond):
        self.seen = dict(x=x, mask=mask, mu=mu, t=t, spks=spks, cond=cond)
        return 0.5 * x + mu


def test_loss_on_a_known_path():
    """x_t = (1 - (1 - sigma) t) x0 + t x1, target x1 - (1 - sigma) x0, conditions dropped where keep is False, the
    prompt prefix as cond, MSE over real frames and bins: computed by hand."""
    model = small(sigma_min=0.01)
    model.estimator = Recorder()
    B, C, n = 2, 8, 12
    g = torch.Generator().manual_seed(1)
    tokens, token_lengths = torch.randint(0, 32, (B, 3), generator=g), torch.tensor([3, 2])
    mel, mel_lengths = torch.randn(B, C, n + 2, generator=g), torch.tensor([n, 9])
    x0, t = torch.randn(B, C, n, generator=g), torch.tensor([0.25, 0.9])
    prompt, keep = torch.tensor([4, 0]), torch.tensor([True, False])
    out = model.loss(tokens, token_lengths, mel, mel_lengths, t=t, noise=x0, prompt_frames=prompt, keep=keep)
    seen, x1 = model.estimator.seen, mel[..., :n]
    mu = model.condition(tokens, token_lengths, mel_lengths).detach()
    total, count = 0.0, 0
    for b in range(B):
        y = (1 - 0.99 * t[b]) * x0[b] + t[b] * x1[b]
        torch.testing.assert_close(seen["x"][b], y)
        if keep[b]:
            torch.testing.assert_close(seen["mu"][b], mu[b])
            torch.testing.assert_close(seen["cond"][b, :, :prompt[b]], x1[b, :, :prompt[b]])
        else:
            assert not seen["mu"][b].any() and not seen["spks"][b].any()
        assert not seen["cond"][b, :, prompt[b]:].any()
        pred = (0.5 * y + seen["mu"][b]).detach()
        u = x1[b] - 0.99 * x0[b]
        for f in range(int(mel_lengths[b])):
            total += float(((pred[:, f] - u[:, f]) ** 2).sum())
            count += C
    assert math.isclose(out["loss"].item(), total / count, rel_tol=1e-5)
    assert seen["mask"][1, 0, 9:].sum() == 0 and seen["mask"][1, 0, :9].all()
    # the encoder loss (Grad-TTS's prior): mu against the mel over real frames and bins
    prior = sum(float(((mu[b, :, :f] - x1[b, :, :f]) ** 2).sum()) for b, f in enumerate(mel_lengths.tolist()))
    assert math.isclose(out["prior"].item(), prior / count, rel_tol=1e-5)


def test_loss_draws_from_the_generator_and_trains():
    """Same generator seed, same loss; prompts within 80 % of each utterance; gradients reach every part; a few
    Adam steps on one batch lower the loss."""
    model = small().train()
    g = torch.Generator().manual_seed(5)
    tokens, token_lengths = torch.randint(0, 32, (4, 4), generator=g), torch.tensor([4, 4, 3, 2])
    mel_lengths = model.mel_frames(token_lengths)
    mel = torch.randn(4, 8, int(mel_lengths.max()), generator=g).cumsum(-1) * 0.3
    a = model.loss(tokens, token_lengths, mel, mel_lengths, generator=torch.Generator().manual_seed(9))
    model.eval()
    b = model.loss(tokens, token_lengths, mel, mel_lengths, generator=torch.Generator().manual_seed(9))
    c = model.loss(tokens, token_lengths, mel, mel_lengths, generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(b["loss"], c["loss"])
    assert (a["prompt_frames"] <= (0.8 * mel_lengths).long()).all() and ((0 <= a["t"]) & (a["t"] <= 1)).all()
    b["loss"].backward()
    for name in ("token_embed.weight", "encoder.layers.0.attn.q.weight", "regulator.net.0.weight",
                 "estimator.down.0.blocks.0.q.weight"):
        assert model.get_parameter(name).grad.abs().sum() > 0, name
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for step in range(30):
        loss = model.loss(tokens, token_lengths, mel, mel_lengths, generator=torch.Generator().manual_seed(step % 3))
        opt.zero_grad()
        loss["loss"].backward()
        opt.step()
        losses.append(loss["loss"].item())
    assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:3]), losses


def test_euler_is_exact_on_a_constant_field():
    x0 = torch.randn(2, 3)
    for grid in (time_grid(7, "cosine"), time_grid(4, "linear"), torch.tensor([0.1, 0.3, 0.35, 1.0])):
        x1 = ode_solve(lambda x, t: torch.full_like(x, 2.5), x0, grid, "euler")
        torch.testing.assert_close(x1, x0 + 2.5 * (grid[-1] - grid[0]), atol=1e-6, rtol=0)
        x1 = ode_solve(lambda x, t: torch.full_like(x, 2.5), x0, grid, "midpoint")
        torch.testing.assert_close(x1, x0 + 2.5 * (grid[-1] - grid[0]), atol=1e-6, rtol=0)


def test_midpoint_beats_euler_on_a_linear_field():
    """dx/dt = a x: x(1) = x0 e^a; Euler's error falls as 1/n, midpoint's as 1/n² and is far smaller."""
    x0 = torch.tensor([1.0, -2.0], dtype=torch.float64)
    exact = x0 * math.exp(-1.5)
    errors = {}
    for solver in ("euler", "midpoint"):
        for n in (8, 16):
            grid = torch.linspace(0, 1, n + 1, dtype=torch.float64)
            errors[solver, n] = (ode_solve(lambda x, t: -1.5 * x, x0, grid, solver) - exact).abs().max().item()
    assert errors["midpoint", 8] < errors["euler", 8] / 10
    assert 1.7 < errors["euler", 8] / errors["euler", 16] < 2.3
    assert 3.4 < errors["midpoint", 8] / errors["midpoint", 16] < 4.6
    with pytest.raises(ValueError, match="solver"):
        ode_solve(lambda x, t: x, x0, time_grid(2), "rk4")


def test_time_dependent_field_sees_the_grid_times():
    """Euler evaluates the field at the grid's times, so ∫ 2t dt over a grid is Σ 2 t_k Δt_k."""
    grid = time_grid(5, "cosine").double()
    x1 = ode_solve(lambda x, t: 2 * t * torch.ones_like(x), torch.zeros(1, dtype=torch.float64), grid, "euler")
    want = sum(2 * grid[k] * (grid[k + 1] - grid[k]) for k in range(5))
    torch.testing.assert_close(x1, want.reshape(1), atol=1e-7, rtol=0)


def test_classifier_free_guidance():
    cond, uncond = torch.randn(3, 4), torch.randn(3, 4)
    torch.testing.assert_close(classifier_free_guidance(cond, uncond, 0.7), 1.7 * cond - 0.7 * uncond)
    # sampling mixes the conditional and unconditional (zeroed mu, speaker, cond) estimates the same way
    model = small()
    model.estimator = Recorder()
    mu, mask = torch.randn(1, 8, 10), torch.ones(1, 1, 10)
    spks, cond, x0 = torch.randn(1, 8), torch.randn(1, 8, 10), torch.randn(1, 8, 10)
    out = model.sample(mu, mask, spks, cond, n_timesteps=1, cfg_rate=0.7, noise=x0)
    v = classifier_free_guidance(0.5 * x0 + mu, 0.5 * x0, 0.7)
    torch.testing.assert_close(out, x0 + v)
    out = model.sample(mu, mask, spks, cond, n_timesteps=1, cfg_rate=0.0, noise=x0)
    torch.testing.assert_close(out, x0 + 0.5 * x0 + mu)


def test_shallow_start_begins_on_the_path_from_mu():
    """``start`` t0 (or the config's ``inference_start``): the ODE starts at (1 - (1 - sigma) t0) x0 + t0 mu and
    integrates the grid rescaled to [t0, 1]; one Euler step of the Recorder's field 0.5 x + mu is computed by hand."""
    model = small(sigma_min=0.01)
    model.estimator = Recorder()
    mu, mask = torch.randn(1, 8, 10), torch.ones(1, 1, 10)
    spks, cond, x0 = torch.randn(1, 8), torch.zeros(1, 8, 10), torch.randn(1, 8, 10)
    t0 = 0.6
    xs = (1 - 0.99 * t0) * x0 + t0 * mu
    out = model.sample(mu, mask, spks, cond, n_timesteps=1, cfg_rate=0.0, noise=x0, start=t0)
    torch.testing.assert_close(model.estimator.seen["t"], torch.tensor(t0))
    torch.testing.assert_close(out, xs + (1 - t0) * (0.5 * xs + mu))
    model.config.inference_start = t0  # the config's default gives the same
    torch.testing.assert_close(model.sample(mu, mask, spks, cond, n_timesteps=1, cfg_rate=0.0, noise=x0), out)
    with pytest.raises(ValueError, match=r"start must lie in \[0, 1\), got 1.0"):
        model.sample(mu, mask, spks, cond, noise=x0, start=1.0)
    # temperature 0 (the config's inference_temperature): no noise, the start is t0 mu itself
    model.config.inference_temperature = 0.0
    out = model.sample(mu, mask, spks, cond, n_timesteps=1, cfg_rate=0.0, noise=x0)
    torch.testing.assert_close(out, t0 * mu + (1 - t0) * (0.5 * t0 * mu + mu))
    with pytest.raises(ValueError, match="field 'inference_start' is -0.1"):
        FlowConfig(inference_start=-0.1)
    with pytest.raises(ValueError, match="field 'inference_temperature' is -1"):
        FlowConfig(inference_temperature=-1)


def test_block_causal_mask_and_prefix_encoding():
    """The reference's grid mask (block_mask_util's example), and a prefix of whole blocks encodes as inside the
    whole utterance: later tokens never change earlier blocks."""
    want = torch.tensor([[1, 1, 1, 0, 0, 0, 0, 0]] * 3 + [[1, 1, 1, 1, 1, 1, 0, 0]] * 3 + [[1] * 8] * 2).bool()
    assert torch.equal(block_causal_mask(8, 3), want)
    model = small()
    tokens = torch.randint(0, 32, (1, 10))
    changed = tokens.clone()
    changed[:, 6:] = (changed[:, 6:] + 1) % 32
    with torch.no_grad():
        full, other = model.encode(tokens, torch.tensor([10])), model.encode(changed, torch.tensor([10]))
        prefix = model.encode(tokens[:, :6], torch.tensor([6]))
    torch.testing.assert_close(full[:, :6], other[:, :6], atol=1e-6, rtol=0)
    torch.testing.assert_close(full[:, :6], prefix, atol=1e-6, rtol=0)
    assert not torch.allclose(full[:, 6:], other[:, 6:])
    assert model.block_size == 3 and model.input_frame_rate == 12.5


def test_mel_frames_rule():
    """int(n / 12.5 · 22050 / 256) in float32, as the reference computes it (≈ 6.89 frames per token)."""
    model = small()
    n = np.arange(0, 2000, dtype=np.int32)
    want = (n.astype(np.float32) / np.float32(12.5) * np.float32(22050) / np.float32(256)).astype(np.int32)
    assert model.mel_frames(torch.from_numpy(n)).tolist() == want.tolist()
    assert model.mel_frames(torch.tensor([5, 11, 16])).tolist() == [34, 75, 110]


def test_batched_inference_pads_with_zeros():
    model = small()
    tokens, lengths = torch.randint(0, 32, (2, 6)), torch.tensor([6, 3])
    mel = model.inference(tokens, lengths, n_timesteps=2)
    frames = model.mel_frames(lengths).tolist()
    assert mel.shape == (2, 8, frames[0]) and not mel[1, :, frames[1]:].any() and mel[1, :, :frames[1]].abs().sum() > 0
    alone = model.inference(tokens[1:, :3], n_timesteps=2, noise=torch.randn(1, 8, frames[1]))
    assert alone.shape == (1, 8, frames[1])


# ------------------------------------------------------------------------------------------------ released layout


def test_read_decoder_config_is_plain_data():
    sections = read_decoder_config(GOLDEN / "config.yaml")
    assert set(sections) == {"flow", "hift"}
    flow, hift = sections["flow"], sections["hift"]
    assert flow["_class"] == "cosyvoice.flow.flow.MaskedDiffWithXvec" and flow["spk_embed_dim"] == 12  # a !ref
    assert flow["decoder"]["cfm_params"]["content"]["sigma_min"] == 1e-6  # a YAML 1.2 float
    assert hift["_class"] == "cosyvoice.hifigan.generator.HiFTGenerator" and hift["sampling_rate"] == 22050
    assert hift["f0_predictor"] == {"_class": "cosyvoice.hifigan.f0_predictor.ConvRNNF0Predictor", "num_class": 1,
                                    "in_channels": 16, "cond_channels": 16}


def test_released_sizes_are_the_preset():
    """The released config.yaml's flow numbers (glm-4-voice-decoder) give the ``glm-4-voice-decoder`` preset."""
    flow = read_decoder_config(GOLDEN)["flow"]
    flow.update(input_size=512, output_size=80, spk_embed_dim=192, vocab_size=16384)
    flow["encoder"].update(output_size=512, attention_heads=8, linear_units=2048, num_blocks=6, block_size=10,
                           input_size=512)
    flow["length_regulator"].update(channels=80)
    flow["decoder"].update(in_channels=240, spk_emb_dim=80)
    flow["decoder"]["estimator"].update(in_channels=320, out_channels=80, channels=[256, 256], attention_head_dim=64,
                                        n_blocks=4, num_mid_blocks=12, num_heads=8)
    assert flow_config_from_released(flow) == FlowConfig.from_name("glm-4-voice-decoder")


def test_released_round_trip(golden):
    """flow.pt -> ours -> the released names gives back every tensor unchanged; and ours -> released -> ours for a
    three-level estimator."""
    theirs = torch.load(GOLDEN / "flow.pt", map_location="cpu", weights_only=True)
    back = flow_state_to_released(golden)
    assert set(back) == set(theirs)
    for k, v in theirs.items():
        assert torch.equal(back[k], v), k
    model = small(estimator_channels=(8, 16, 8))
    names = flow_released_names(model)
    assert names["estimator.down.2.resample.weight"] == "decoder.estimator.down_blocks.2.2.weight"
    assert names["estimator.up.1.resample.weight"] == "decoder.estimator.up_blocks.1.2.conv.weight"
    ours = flow_state_from_released(flow_state_to_released(model), model)
    for k, v in model.state_dict().items():
        assert torch.equal(ours[k], v), k


@pytest.fixture
def folder(tmp_path) -> Path:
    out = tmp_path / "glm-4-voice-decoder"
    shutil.copytree(GOLDEN, out)
    return out


def _drop(key):
    return lambda s: s.pop(key)


def _set(key, value):
    return lambda s: s.__setitem__(key, value)


@pytest.mark.parametrize("edit, message", [
    (_drop("encoder.encoders.1.self_attn.linear_pos.weight"),
     "weight 'encoder.encoders.1.self_attn.linear_pos.weight' missing"),
    (_set("decoder.estimator.mid_blocks.0.1.0.attn1.to_q.weight", torch.zeros(3, 3)),
     "weight 'decoder.estimator.mid_blocks.0.1.0.attn1.to_q.weight' has shape [3, 3]"),
    (_set("decoder.estimator.extra.weight", torch.zeros(1)),
     "weight 'decoder.estimator.extra.weight' has no counterpart"),
], ids=["missing", "shape", "unexpected"])
def test_bad_weights_name_the_file_and_the_key(folder, edit, message):
    state = torch.load(folder / "flow.pt", weights_only=True)
    edit(state)
    torch.save(state, folder / "flow.pt")
    for path in (folder, folder / "flow.pt"):
        with pytest.raises(ValueError, match=re.escape(f"{folder / 'flow.pt'}: {message}")):
            load_released_flow(path)


def test_missing_files_are_named(folder):
    with pytest.raises(FileNotFoundError, match="missing.*flow.pt"):
        load_released_flow(folder / "missing")
    (folder / "config.yaml").unlink()
    with pytest.raises(FileNotFoundError, match="config.yaml"):
        load_released_flow(folder)


def test_vocabulary_mismatch_is_named(folder):
    text = (folder / "config.yaml").read_text().replace("vocab_size: 40", "vocab_size: 64")
    (folder / "config.yaml").write_text(text)
    with pytest.raises(ValueError, match=r"flow\.pt: token vocabulary mismatch: .* 40 speech tokens, but "
                                         r".*config\.yaml field 'flow\.vocab_size' is 64"):
        load_released_flow(folder)
    config = flow_config_from_released(read_decoder_config(GOLDEN)["flow"]).replace(vocab_size=16384)
    with pytest.raises(ValueError, match="token vocabulary mismatch.*FlowConfig field 'vocab_size' is 16384"):
        load_released_flow(GOLDEN, config)


@pytest.mark.parametrize("line, new, field", [
    ("use_cnn_module: False", "use_cnn_module: True", "flow.encoder.use_cnn_module"),
    ("selfattention_layer_type: 'block_rel_selfattn'", "selfattention_layer_type: 'rel_selfattn'",
     "flow.encoder.selfattention_layer_type"),
    ("act_fn: 'gelu'", "act_fn: 'snakebeta'", "flow.decoder.estimator.act_fn"),
    ("macaron_style: False", "macaron_style: False\n        cnn_gate: 3", "flow.encoder.cnn_gate"),
    ("!new:cosyvoice.transformer.encoder.BlockConformerEncoder", "!new:cosyvoice.transformer.encoder.ConformerEncoder",
     "flow.encoder"),
    ("in_channels: 64", "in_channels: 60", "flow.decoder.estimator.in_channels"),
])
def test_unsupported_options_name_config_yaml_and_the_field(folder, line, new, field):
    text = (folder / "config.yaml").read_text()
    assert line in text
    (folder / "config.yaml").write_text(text.replace(line, new, 1))
    with pytest.raises(ValueError, match=rf"config\.yaml: field '{re.escape(field)}'"):
        load_released_flow(folder)


@pytest.mark.parametrize("tag", ["!apply:os.system ['echo hi']", "!name:torch.nn.Linear", "!module:os",
                                 "!!python/object/apply:os.getcwd []", "!ref <a> * 2"])
def test_config_yaml_never_runs_code(folder, tag):
    text = (folder / "config.yaml").read_text()
    (folder / "config.yaml").write_text(text.replace("sample_rate: 22050", f"sample_rate: 22050\na: 1\nbad: {tag}", 1)
                                        .replace("sampling_rate: !ref <sample_rate>", "sampling_rate: !ref <bad>"))
    with pytest.raises(ValueError, match=r"config\.yaml"):
        read_decoder_config(folder)
