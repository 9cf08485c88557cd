"""LoRA on the LM stages: the adapted model starts as its base, only the adapters train, merging keeps the function,
checkpoints hold the trained weights only and resume exactly, exports (merged or not) load in every later stage."""

import json

import lightning as L
import pytest
import torch
from safetensors.torch import load_file

from lit_keomni.checkpoints import Export, load_lm
from lit_keomni.configs import TransformerConfig
from lit_keomni.nn.lora import LoRAConfig, LoRALinear, apply_lora, merge_lora, merge_lora_state, parameter_counts
from lit_keomni.nn.transformer import Transformer
from tests.test_stage4 import LossRecorder, make

TINY_LM = {"n_layer": 2, "n_embd": 64, "n_head": 4, "n_kv_head": 2, "intermediate_size": 172, "block_size": 512}
LORA = {"rank": 4, "alpha": 8.0, "base_dtype": "float32"}


def tiny(seed=0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(TransformerConfig.from_name("tiny", **{**TINY_LM, "vocab_size": 120})).eval()


def test_starts_as_the_base_and_only_adapters_train():
    base = tiny()
    x = torch.randint(0, 120, (2, 16))
    with torch.no_grad():
        want = base(x)
    model = apply_lora(tiny(), LoRAConfig.from_dict(LORA))
    with torch.no_grad():
        assert torch.equal(model(x), want)  # B = 0: exactly the base
    lora = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert len(lora) == 7 * 2  # q, k, v, o, gate, up, down in each of 2 blocks
    model.train()
    model(x).float().pow(2).mean().backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == n.endswith(("lora_a", "lora_b")), n
    trainable, total = parameter_counts(model)
    assert trainable == sum(4 * (m.in_features + m.out_features) for m in lora) and total > 10 * trainable


def test_merge_equals_the_adapted_forward():
    model = apply_lora(tiny(), LoRAConfig.from_dict({**LORA, "targets": ["q_proj", "v_proj", "down_proj"]}))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_b.normal_(0, 0.05)
    x = torch.randint(0, 120, (2, 16))
    with torch.no_grad():
        adapted = model(x)
        from_state = tiny()
        from_state.load_state_dict(merge_lora_state(model.state_dict(), LoRAConfig.from_dict(LORA)))
        merged = merge_lora(model)(x)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    torch.testing.assert_close(merged, adapted, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(from_state(x), adapted, rtol=1e-5, atol=1e-5)
    assert (merged - tiny()(x)).abs().max() > 1e-3  # the adapters did change the model


def test_bf16_base_keeps_adapters_in_float32():
    model = apply_lora(tiny(), LoRAConfig.from_dict({"rank": 2}))
    q = model.blocks[0].attn.q_proj
    assert q.weight.dtype == torch.bfloat16 and q.lora_a.dtype == torch.float32 and not q.weight.requires_grad


@pytest.mark.parametrize("bad, message", [({"rank": 0}, "field 'rank' is 0"), ({"targets": ["wq"]}, "names no linear"),
                                          ({"rnak": 4}, r"unknown field\(s\) \['rnak'\]")])
def test_bad_lora_config_is_named(bad, message):
    with pytest.raises(ValueError, match=message):
        apply_lora(tiny(), LoRAConfig.from_dict(bad))


# ---------------------------------------------------------------------------------------------- in a stage


def sft(prepared, stage1_export, stage2_export, work, root, steps, callbacks, **kw):
    """Stage 4 (discrete) with LoRA on the stage-2 export, as tests/test_stage4.py builds it."""
    return make("discrete", prepared, stage1_export, work, root, steps, callbacks, init_from=str(stage2_export),
                lora=LORA, **kw)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("lora")


def test_checkpoint_holds_the_adapters_and_resumes_exactly(prepared, stage1_export, stage2_export, work, tmp_path):
    full = LossRecorder()
    model, data, trainer = sft(prepared, stage1_export, stage2_export, work, tmp_path / "a", 4, [full, Export()],
                               loss_chunk=37)
    trainer.fit(model, data)
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "b", save_last=True, save_top_k=0,
                                               every_n_train_steps=2)
    model, data, trainer = sft(prepared, stage1_export, stage2_export, work, tmp_path / "b", 4,
                               [LossRecorder(stop_at=2), ckpt], loss_chunk=37)
    trainer.fit(model, data)
    saved = torch.load(tmp_path / "b" / "last.ckpt", weights_only=False)
    assert saved["state_dict"] and all(k.endswith(("lora_a", "lora_b")) for k in saved["state_dict"])
    assert saved["lora_base"] == str(stage2_export)
    resumed = LossRecorder()
    model, data, trainer = sft(prepared, stage1_export, stage2_export, work, tmp_path / "c", 4, [resumed],
                               loss_chunk=37)
    trainer.fit(model, data, ckpt_path=str(tmp_path / "b" / "last.ckpt"))
    assert sorted(resumed.losses) == [3, 4]
    for step in resumed.losses:
        assert resumed.losses[step] == pytest.approx(full.losses[step], rel=1e-5), step

    # the merged export is a plain speech_lm: the base plus the trained deltas
    lm, _, meta = load_lm(tmp_path / "a" / "export")
    base, _, _ = load_lm(stage2_export, "text_to_token")
    assert meta["lora_merged"]["rank"] == 4
    changed = [k for k, v in lm.state_dict().items() if not torch.equal(v, base.state_dict()[k])]
    assert changed and all(k.endswith(("_proj.weight")) for k in changed)


def test_unmerged_export_loads_as_the_merged_one(prepared, stage1_export, stage2_export, work, tmp_path):
    for merge in (True, False):
        model, data, trainer = sft(prepared, stage1_export, stage2_export, work, tmp_path / str(merge), 2,
                                   [Export()], merge_lora=merge)
        trainer.fit(model, data)
    separate = tmp_path / "False" / "export"
    assert (separate / "lora.safetensors").is_file()
    assert all(k.endswith(("lora_a", "lora_b")) for k in load_file(str(separate / "lora.safetensors")))
    assert json.loads((separate / "config.json").read_text())["lora"]["rank"] == 4
    a, _, _ = load_lm(tmp_path / "True" / "export")
    b, _, _ = load_lm(separate)
    for k, v in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[k], v, rtol=1e-6, atol=1e-6, msg=k)


def test_resume_with_another_base_is_refused(prepared, stage1_export, stage2_export, work, tmp_path):
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0, every_n_train_steps=1)
    model, data, trainer = sft(prepared, stage1_export, stage2_export, work, tmp_path, 1, [ckpt])
    trainer.fit(model, data)
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)
    saved["lora_base"] = "/elsewhere"
    torch.save(saved, tmp_path / "other.ckpt")
    model, data, trainer = sft(prepared, stage1_export, stage2_export, work, tmp_path / "r", 2, [])
    with pytest.raises(ValueError, match=r"adapts model.init_from='/elsewhere'"):
        trainer.fit(model, data, ckpt_path=str(tmp_path / "other.ckpt"))


def test_compiled_blocks_with_adapters_match_eager():
    from lit_keomni.distributed import apply_compile

    eager = apply_lora(tiny(), LoRAConfig.from_dict(LORA)).train()
    compiled = apply_lora(tiny(), LoRAConfig.from_dict(LORA)).train()
    compiled.load_state_dict(eager.state_dict())
    with torch.no_grad():
        for m in (eager, compiled):
            for layer in m.modules():
                if isinstance(layer, LoRALinear):
                    layer.lora_b.fill_(0.01)
    apply_compile(compiled.blocks)
    x = torch.randint(0, 120, (2, 16))
    target = torch.randint(0, 120, (2, 16))
    for m in (eager, compiled):
        losses, _ = m(x, targets=target)
        losses.mean().backward()
    torch.testing.assert_close(compiled(x, targets=target)[0], eager(x, targets=target)[0], rtol=1e-4, atol=1e-5)
    for (n, a), (_, b) in zip(eager.named_parameters(), compiled.named_parameters()):
        assert (a.grad is None) == (b.grad is None), n
        if a.grad is not None:
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=n)
