"""Stage 6 on tiny models: the unit generator's upsampling, learning per agent speaker with the frozen stage-5
predictor in validation, exact resume, export round trip, handoff errors, the paper recipe."""

import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from litdata import StreamingDataset

from datamodules.streaming import chunks_dir
from datamodules.unit_generator import UnitGeneratorDataModule
from lit_keomni.checkpoints import AtomicCheckpointIO, Export, load_duration, load_unit_generator, write_export
from lit_keomni.configs import TransformerConfig
from lit_keomni.nn.speech_decoder import DurationPredictor, UnitGenerator, decode_units
from lit_keomni.stages.duration import DurationStage
from lit_keomni.stages.unit_generator import UnitGeneratorStage
from tests.test_stage4 import LossRecorder
from tests.test_stage5 import DECODER_TINY, ROOT, data_module, decoder_work, keomni_export, printed  # noqa: F401

SPEAKER = "agentFemale"


@pytest.fixture(scope="module")
def duration_export(prepared, stage1_export, keomni_export, decoder_work, tmp_path_factory) -> Path:
    """A stage-5 export of agentFemale from a 6-step fit."""
    tmp = tmp_path_factory.mktemp("stage5")
    L.seed_everything(5)
    model = DurationStage(config="tiny", overrides=DECODER_TINY, llm_from=str(keomni_export),
                          units_from=str(stage1_export), warmup_steps=2, lr=3e-3, export_dir=str(tmp / "export"))
    data = data_module(prepared, stage1_export, keomni_export, decoder_work, speaker=SPEAKER)
    trainer = L.Trainer(accelerator="cpu", max_steps=6, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, callbacks=[Export()],
                        default_root_dir=str(tmp))
    trainer.fit(model, data)
    return tmp / "export"


def make(prepared, stage1_export, keomni_export, decoder_work, tmp_path, max_steps, callbacks, **kw):
    L.seed_everything(5)
    args = {"llm_from": str(keomni_export), "units_from": str(stage1_export), "warmup_steps": 2, "lr": 3e-3,
            "export_dir": str(tmp_path / "export"), **kw}
    model = UnitGeneratorStage(config="tiny", overrides=DECODER_TINY, **args)
    data = UnitGeneratorDataModule(speaker=SPEAKER, llm_from=str(keomni_export), units_from=str(stage1_export),
                                   tokens_dir=str(decoder_work["tokens"]), decoder_dir=str(decoder_work["dir"]),
                                   data_dir=str(prepared), batch_size=4, num_workers=0)
    trainer = L.Trainer(accelerator="cpu", max_steps=max_steps, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=2,
                        val_check_interval=max_steps, check_val_every_n_epoch=None, callbacks=callbacks,
                        default_root_dir=str(tmp_path), plugins=[AtomicCheckpointIO()])
    return model, data, trainer


def test_unit_generator_frames_follow_durations():
    torch.manual_seed(0)
    gen = UnitGenerator(16, 10, TransformerConfig.from_name("tiny", **DECODER_TINY)).eval()
    h, mask = torch.randn(2, 4, 16), torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]]).bool()
    durations = torch.tensor([[2, 0, 3, 1], [1, 2, 5, 5]])  # row 1's padding tokens get no frames
    with torch.no_grad():
        logits = gen(h, durations, mask)
        alone = gen(h[1:, :2], durations[1:, :2], mask[1:, :2])
    assert logits.shape == (2, 6, 10)
    torch.testing.assert_close(logits[1, :3], alone[0])  # padding changes nothing
    # the generator sees the frame's place inside its token: two frames of one token differ
    assert not torch.allclose(logits[0, 0], logits[0, 1])
    predictor = DurationPredictor(16, TransformerConfig.from_name("tiny", **DECODER_TINY)).eval()
    units = decode_units(predictor, gen, h, mask, min_frames=3)
    assert [len(u) for u in units] >= [3, 3] and all(((u >= 0) & (u < 10)).all() for u in units)


def test_learns_with_frozen_duration_predictor_and_round_trips(prepared, stage1_export, keomni_export, decoder_work,
                                                               duration_export, tmp_path):
    rec = LossRecorder()
    model, data, trainer = make(prepared, stage1_export, keomni_export, decoder_work, tmp_path, 20, [rec, Export()],
                                duration_from=str(duration_export))
    frozen = {k: v.clone() for k, v in load_duration(duration_export)[0].state_dict().items()}
    trainer.fit(model, data)
    first, last = np.mean([rec.losses[s] for s in (1, 2, 3)]), np.mean([rec.losses[s] for s in (18, 19, 20)])
    assert last < 0.8 * first, (first, last)
    m = trainer.callback_metrics
    for key in ("val/unit_acc", "val/baseline_unit_acc", "val/unit_acc_predicted_durations",
                "val/length_error_predicted"):
        assert key in m, key
    for k, v in model._durations[0].state_dict().items():
        assert torch.equal(v, frozen[k]), k  # the duration predictor stays frozen
    optimised = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert not optimised & {id(p) for p in model._durations[0].parameters()}

    ds = StreamingDataset(str(chunks_dir(decoder_work["dir"] / SPEAKER, "train")))
    assert {ds[i]["speaker"] for i in range(len(ds))} == {SPEAKER}  # one agent voice

    loaded, meta = load_unit_generator(tmp_path / "export")
    assert (meta["kind"], meta["speaker"], meta["num_units"], meta["frame_rate"], meta["hidden_size"]) == (
        "unit_generator", SPEAKER, 16, 12.5, 64)
    assert meta["llm_fingerprint"] == decoder_work["stamp"]["llm_fingerprint"]
    assert meta["units_fingerprint"] == decoder_work["stamp"]["units_fingerprint"]
    h, mask = torch.randn(2, 5, 64), torch.tensor([[1] * 5, [1] * 3 + [0] * 2]).bool()
    durations = torch.tensor([[1, 2, 0, 3, 1], [2, 2, 2, 0, 0]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(h, durations, mask), model.model.cpu().eval()(h, durations, mask))


def test_resume_gives_identical_next_losses(prepared, stage1_export, keomni_export, decoder_work, tmp_path):
    full = LossRecorder()
    model, data, trainer = make(prepared, stage1_export, keomni_export, decoder_work, tmp_path / "a", 4, [full])
    trainer.fit(model, data)
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "b", save_last=True, save_top_k=0,
                                               every_n_train_steps=2)
    model, data, trainer = make(prepared, stage1_export, keomni_export, decoder_work, tmp_path / "b", 4,
                                [LossRecorder(stop_at=2), ckpt])
    trainer.fit(model, data)
    resumed = LossRecorder()
    model, data, trainer = make(prepared, stage1_export, keomni_export, decoder_work, tmp_path / "c", 4, [resumed])
    trainer.fit(model, data, ckpt_path=str(tmp_path / "b" / "last.ckpt"))
    assert sorted(resumed.losses) == [3, 4]
    for step in resumed.losses:
        assert resumed.losses[step] == pytest.approx(full.losses[step], rel=1e-5), step


def test_handoff_errors_name_file_and_field(prepared, stage1_export, keomni_export, decoder_work, duration_export,
                                            tmp_path):
    # a duration predictor of another LLM width
    meta = load_duration(duration_export)[1]
    wide = DurationPredictor(128, TransformerConfig.from_name("tiny", **DECODER_TINY))
    fields = {k: meta[k] for k in ("llm_fingerprint", "num_units", "frame_rate", "units_fingerprint", "speaker")}
    write_export(tmp_path / "wide", kind="duration", config=wide.config.to_dict(), state_dict=wide.state_dict(),
                 extra={**fields, "hidden_size": 128})
    with pytest.raises(ValueError, match=r"wide/config.json: field 'hidden_size' is 128, expected 64"):
        UnitGeneratorStage(llm_from=str(keomni_export), units_from=str(stage1_export),
                           duration_from=str(tmp_path / "wide")).configure_model()
    wrong_kind = r"export/config.json: field 'kind' is 'speech_tokenizer', expected 'duration'"
    with pytest.raises(ValueError, match=wrong_kind):
        UnitGeneratorStage(llm_from=str(keomni_export), units_from=str(stage1_export),
                           duration_from=str(stage1_export)).configure_model()
    with pytest.raises(ValueError, match=r"config.json: field 'kind' is 'speech_tokenizer', expected 'keomni_lm'"):
        UnitGeneratorStage(llm_from=str(stage1_export), units_from=str(stage1_export)).configure_model()
    # a duration predictor of the other agent voice
    write_export(tmp_path / "male", kind="duration", config=wide.config.to_dict(),
                 state_dict=load_duration(duration_export)[0].state_dict(),
                 extra={**fields, "hidden_size": 64, "speaker": "agentMale"})
    model, data, trainer = make(prepared, stage1_export, keomni_export, decoder_work, tmp_path, 1, [],
                                duration_from=str(tmp_path / "male"))
    with pytest.raises(ValueError, match=r"male/config.json: field 'speaker' is 'agentMale', but data.speaker"):
        trainer.fit(model, data)


def test_features_rebuild_when_the_llm_changes(prepared, stage1_export, keomni_export, decoder_work, tmp_path):
    model, data, trainer = make(prepared, stage1_export, keomni_export, decoder_work, tmp_path, 1, [])
    data.prepare_data()
    stamp_path = Path(data.chunks_root()) / "decoder.json"
    stamp = json.loads(stamp_path.read_text())
    stamp_path.write_text(json.dumps({**stamp, "llm_fingerprint": "an older export"}))
    data.prepare_data()
    assert json.loads(stamp_path.read_text())["llm_fingerprint"] == stamp["llm_fingerprint"]


def test_paper_recipe(capsys, monkeypatch):
    cfg = printed(ROOT / "recipes" / "paper" / "stage6.yaml", capsys, monkeypatch)
    m, d, t = cfg["model"]["init_args"], cfg["data"]["init_args"], cfg["trainer"]
    assert m["lr"] == 1e-4 and t["max_epochs"] == 5 and d["speaker"] and m["duration_from"]
    mesh = t["strategy"]["init_args"]
    assert mesh["data_parallel_size"] * d["batch_size"] * t["accumulate_grad_batches"] == 256
    with torch.device("meta"):  # Llama-3.1-8B's hidden size 4096 in, 4000 HuBERT k-means units out
        gen = UnitGenerator(4096, 4000, TransformerConfig.from_name(m["config"], **(m["overrides"] or {})))
    assert gen.head.out_features == 4000 and not gen.config.causal and gen.config.block_size >= 3000


def test_cpu_recipe_chains_the_stages(capsys, monkeypatch):
    cfg = printed(ROOT / "recipes" / "stage6.yaml", capsys, monkeypatch)
    m, d = cfg["model"]["init_args"], cfg["data"]["init_args"]
    assert m["duration_from"] == "checkpoints/stage5/export" and d["speaker"] == SPEAKER
    assert m["llm_from"] == d["llm_from"] == "checkpoints/stage4_keomni/export"
    assert m["export_dir"] == "checkpoints/stage6/export"
