"""``torch.compile`` per block (``distributed.apply_compile``, the stages' ``compile`` hyper-parameter) on CPU:
the same losses as eager, unchanged state-dict keys, and every stage wiring it in ``configure_model``."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from lit_keomni.checkpoints import lm_tokenizer
from lit_keomni.configs import TransformerConfig
from lit_keomni.distributed import apply_compile
from lit_keomni.nn.transformer import Transformer
from lit_keomni.text.templates import pad_batch, tts

TINY_LM = {"n_layer": 2, "n_embd": 64, "n_head": 4, "n_kv_head": 2, "intermediate_size": 172, "block_size": 512}


def _compiled(module: torch.nn.Module) -> bool:
    return getattr(module, "_compiled_call_impl", None) is not None


def test_apply_compile_in_place_keeps_state_dict_keys():
    model = Transformer(TransformerConfig.from_name("tiny", **TINY_LM, vocab_size=100))
    keys, blocks = list(model.state_dict()), list(model.blocks)
    apply_compile(model.blocks)
    assert list(model.state_dict()) == keys  # no "_orig_mod." prefix: exports and checkpoints stay interchangeable
    assert list(model.blocks) == blocks and all(_compiled(b) for b in model.blocks)
    assert not _compiled(model) and not _compiled(model.embed)
    with pytest.raises(ValueError, match="blocks is empty"):
        apply_compile([])


class LossRecorder(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def _fit_stage2(stage1_export, tmp_path, compile: bool) -> tuple[list[float], object]:
    """Two AdamW steps of a tiny stage-2 model on two fixed batches of one shape (one compilation)."""
    from lit_keomni.stages.text_to_token import TextToToken

    tok, _ = lm_tokenizer(stage1_export)
    g = torch.Generator().manual_seed(0)
    texts = ["Sam lives with a duck.", "小红是银湖城人。", "Two and three make five.", "The cat sleeps.",
             "Tom has four apples.", "今天很好。", "Anna reads a book.", "The sun is warm."]
    rows = [tts(tok, t, torch.randint(0, 16, (20 + 3 * i,), generator=g).tolist()) for i, t in enumerate(texts)]
    idx, target = pad_batch(rows, tok.pad_id)
    batches = [{"input": idx[k : k + 4], "target": target[k : k + 4]} for k in (0, 4)]
    L.seed_everything(5)
    model = TextToToken(config="tiny", overrides=TINY_LM, speech_export=str(stage1_export), warmup_steps=1, lr=3e-3,
                        export_dir=None, compile=compile)
    rec = LossRecorder()
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0,
                        limit_val_batches=0, callbacks=[rec], default_root_dir=str(tmp_path))
    trainer.fit(model, DataLoader(batches, batch_size=None))
    return rec.losses, model


def test_stage2_compiled_fit_matches_eager(stage1_export, tmp_path):
    eager, eager_model = _fit_stage2(stage1_export, tmp_path / "eager", compile=False)
    compiled, compiled_model = _fit_stage2(stage1_export, tmp_path / "compiled", compile=True)
    assert all(_compiled(b) for b in compiled_model.model.blocks)
    assert not any(_compiled(b) for b in eager_model.model.blocks)
    assert len(eager) == len(compiled) == 2
    assert compiled == pytest.approx(eager, rel=1e-4), (compiled, eager)  # step 2 also checks the first update
    a, b = eager_model.model.state_dict(), compiled_model.model.state_dict()
    assert list(a) == list(b)
    for k in a:
        # AdamW moves each weight by up to ~lr per step (6e-3 here); float rounding differences of the compiled
        # kernels change that by < 1e-4 (Adam rescales near-zero gradients, so relative tolerances do not fit)
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=5e-4, msg=k)


def _stage(name: str, prepared, stage1_export):
    if name == "tokenizer":
        from tests.conftest import STAGE1_TINY
        from lit_keomni.stages.tokenizer import SpeechTokenizer

        return SpeechTokenizer(config="tiny", overrides=STAGE1_TINY, tokenizer=str(prepared / "tokenizer.json"),
                               compile=True), ["encoder.layers", "decoder.layers"]
    if name == "pretrain":
        from lit_keomni.stages.pretrain import Pretrain

        return Pretrain(config="tiny", overrides=TINY_LM, speech_export=str(stage1_export), compile=True), ["blocks"]
    from lit_keomni.stages.sft import SFT

    mode = name.split("-")[1]
    model = SFT(mode=mode, config="tiny", overrides=TINY_LM, init_from=None, speech_export=str(stage1_export),
                encoder_from=str(stage1_export), compile=True)
    return model, ["blocks"] if mode == "discrete" else ["encoder.layers", "llm.blocks"]


@pytest.mark.parametrize("name", ["tokenizer", "pretrain", "sft-discrete", "sft-continuous"])
def test_every_stage_compiles_its_blocks(name, prepared, stage1_export):
    stage, lists = _stage(name, prepared, stage1_export)
    stage.configure_model()
    for path in lists:
        blocks = list(stage.model.get_submodule(path))
        assert blocks and all(_compiled(b) for b in blocks), path
    assert not _compiled(stage.model)


def test_vocoder_compiles_generator_and_discriminators(stage1_export):
    from lit_keomni.stages.vocoder import Vocoder

    stage = Vocoder(config="tiny", units_from=str(stage1_export), compile=True)
    stage.configure_model()
    assert all(_compiled(m) for m in (stage.generator, stage.mpd, stage.msd))
    eager = Vocoder(config="tiny", units_from=str(stage1_export))
    eager.configure_model()
    assert not _compiled(eager.generator)
