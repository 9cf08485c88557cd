"""Stage 5 on tiny models: duration targets (hand-made cases), length regulation, the shared speech-decoder features
of a tiny KE-Omni export, learning, exact resume, export round trip, handoff errors, the paper recipe."""

from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from litdata import StreamingDataset

from datamodules.duration import DurationDataModule, build_features
from datamodules.streaming import chunks_dir
from lit_keomni.checkpoints import AtomicCheckpointIO, Export, lm_tokenizer, load_duration, load_keomni, write_export
from lit_keomni.configs import SpeechTokenizerConfig, TransformerConfig
from lit_keomni.durations import answer_durations, answer_tokens, char_seconds, token_frames
from lit_keomni.nn.adapter import SpeechAdapter
from lit_keomni.nn.keomni import KeOmni, answer_hidden_states
from lit_keomni.nn.speech_decoder import DurationPredictor, cumulative_round, length_regulate
from lit_keomni.nn.transformer import Transformer
from lit_keomni.nn.whisper import SpeechEncoder
from lit_keomni.stages.duration import DurationStage
from lit_keomni.text.templates import Exchange, keomni_dialogue
from tests.test_stage4 import ENCODER, TINY_LM, LossRecorder
from tests.test_paper_recipes import printed

ROOT = Path(__file__).resolve().parent.parent
DECODER_TINY = {"n_layer": 2, "n_embd": 64, "n_head": 4, "n_kv_head": 2, "intermediate_size": 172, "block_size": 512}


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def keomni_export(stage1_export, tmp_path_factory) -> Path:
    """A random tiny KE-Omni export (kind keomni_lm) in the stage-1 export's speech-extended vocabulary."""
    tok, _ = lm_tokenizer(stage1_export)
    torch.manual_seed(0)
    llm = Transformer(TransformerConfig.from_name("tiny", **TINY_LM).replace(vocab_size=tok.vocab_size))
    model = KeOmni(SpeechEncoder(SpeechTokenizerConfig(**ENCODER)), SpeechAdapter(32, 64, stack=5, hidden=48), llm)
    out = tmp_path_factory.mktemp("keomni") / "export"
    return write_export(out, kind="keomni_lm", config=model.config_dict(), state_dict=model.state_dict(),
                        files={"tokenizer": tok.save})


@pytest.fixture(scope="session")
def decoder_work(prepared, stage1_export, speech_tokens, keomni_export, tmp_path_factory) -> dict:
    """The speech-decoder features of the tiny corpus: every agent turn (``all``), built once; the data modules of
    one speaker build theirs when first used."""
    out = tmp_path_factory.mktemp("decoder")
    stamp = build_features(str(keomni_export), str(stage1_export), str(prepared), str(speech_tokens), str(out / "all"))
    return {"dir": out, "stamp": stamp, "tokens": speech_tokens}


def data_module(prepared, stage1_export, keomni_export, decoder_work, **kw):
    args = dict(llm_from=str(keomni_export), units_from=str(stage1_export), tokens_dir=str(decoder_work["tokens"]),
                decoder_dir=str(decoder_work["dir"]), data_dir=str(prepared), batch_size=4, num_workers=0)
    return DurationDataModule(**{**args, **kw})


def make(prepared, stage1_export, keomni_export, decoder_work, tmp_path, max_steps, callbacks, **kw):
    L.seed_everything(5)
    args = {"llm_from": str(keomni_export), "units_from": str(stage1_export), "warmup_steps": 2, "lr": 3e-3,
            "export_dir": str(tmp_path / "export"), **kw}
    model = DurationStage(config="tiny", overrides=DECODER_TINY, **args)
    data = data_module(prepared, stage1_export, keomni_export, decoder_work)
    trainer = L.Trainer(accelerator="cpu", max_steps=max_steps, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=2,
                        val_check_interval=max_steps, check_val_every_n_epoch=None, callbacks=callbacks,
                        default_root_dir=str(tmp_path), plugins=[AtomicCheckpointIO()])
    return model, data, trainer


# ---------------------------------------------------------------------------------------------- duration targets


def test_english_words_spread_over_characters_and_gaps_over_spaces():
    # "Hi, you." with 0.1 s of silence between the words and 0.4 s after the last one, 1 s in all
    secs = char_seconds("Hi, you.", [("Hi", 0.0, 0.2), ("you", 0.3, 0.6)], "en", 1.0)
    assert secs == pytest.approx([0.1, 0.1, 0.05, 0.05, 0.1, 0.1, 0.1, 0.4])
    # tokens "Hi" ", you" "." merged from characters; 25 frames = 1 s at 25 Hz
    assert token_frames(secs, [(0, 2), (2, 7), (7, 8)], 25) == [5, 10, 10]
    # a special token without characters gets nothing; the total is always the number of unit frames
    assert token_frames(secs, [(0, 2), (2, 7), (7, 8), (8, 8)], 13) == [3, 5, 5, 0]


def test_chinese_characters_take_the_gaps_between_them():
    # per-character words; a leading gap goes to the first character, the gap between 你 and 好 to 你 (no
    # character lies between them), the trailing time to the final punctuation
    secs = char_seconds("你好。", [("你", 0.1, 0.3), ("好", 0.35, 0.45)], "zh", 0.6)
    assert secs == pytest.approx([0.35, 0.1, 0.15])
    assert token_frames(secs, [(0, 1), (1, 2), (2, 3)], 12) == [7, 2, 3]
    # without trailing punctuation the last character keeps the trailing silence
    assert char_seconds("你好", [("你", 0.0, 0.2), ("好", 0.2, 0.4)], "zh", 0.5) == pytest.approx([0.2, 0.3])


def test_words_must_time_the_text():
    with pytest.raises(ValueError, match="field 'words'"):
        char_seconds("Hi you", [("Hi", 0.0, 0.2)], "en", 1.0, source="utt7")
    with pytest.raises(ValueError, match="utt7: field 'words"):
        answer_durations(None, "Hi", '[["Hi", 0.5, 0.2]]', "en", 5, 12.5, source="utt7")


def test_cumulative_rounding_keeps_the_total():
    assert cumulative_round(torch.tensor([0.4, 0.4, 0.4, 0.4, 1.4])).tolist() == [0, 1, 0, 1, 1]
    x = torch.rand(3, 50) * 3
    assert cumulative_round(x).sum(-1).tolist() == torch.round(x.double().sum(-1)).long().tolist()


def test_answer_tokens_are_the_dialogue_tokens(stage1_export):
    tok, _ = lm_tokenizer(stage1_export)
    for text in ("Sam lives with a duck.", "小红是银湖城人。"):
        ids, offsets = answer_tokens(tok, text)
        full, mask = keomni_dialogue(tok, [Exchange(user_frames=3, text=text)])
        trained = [i for i, m in zip(full, mask) if m]
        assert trained[:-1] == ids and trained[-1] == tok.eos_id
        assert "".join(text[a:b] for a, b in offsets) == text  # every character in exactly one token


def test_length_regulate_values_lengths_and_zero_durations():
    h = torch.arange(12.0).view(2, 3, 2)
    up, mask = length_regulate(h, torch.tensor([[2, 0, 1], [1, 1, 0]]))
    assert up.shape == (2, 3, 2) and mask.tolist() == [[True, True, True], [True, True, False]]
    assert up[0].tolist() == [[0, 1], [0, 1], [4, 5]]  # token 1 has no frame
    assert up[1].tolist() == [[6, 7], [8, 9], [0, 0]]  # padding frames are zero
    up, mask = length_regulate(h, torch.zeros(2, 3, dtype=torch.long))
    assert up.shape == (2, 0, 2) and mask.shape == (2, 0)
    with pytest.raises(ValueError, match=">= 0"):
        length_regulate(h, torch.tensor([[1, -1, 0], [0, 0, 0]]))


# ---------------------------------------------------------------------------------------------- features


def test_features_per_agent_turn(prepared, keomni_export, decoder_work):
    stamp = decoder_work["stamp"]
    assert stamp["hidden_size"] == 64 and stamp["frame_rate"] == 12.5 and stamp["speaker"] is None
    assert stamp["counts"]["train"]["speakers"] == ["agentFemale", "agentMale"]
    ds = StreamingDataset(str(chunks_dir(decoder_work["dir"] / "all", "train")))
    items = [ds[i] for i in range(len(ds))]
    assert len(items) == stamp["counts"]["train"]["agent_turns"] > 10
    for it in items:
        assert it["hidden"].dtype == np.float16 and it["hidden"].shape == (len(it["ids"]), 64)
        assert int(it["durations"].sum()) == len(it["codes"]) and (it["durations"] >= 0).all()
    # the same hidden states as chat computes for the dialogue's last answer (a KV-cache generation equals them)
    model, tok, _ = load_keomni(keomni_export)
    from datamodules.sft import group_exchanges
    from datamodules.tokenizer import asr_example

    raw = StreamingDataset(str(chunks_dir(prepared, "train")))
    turns = [raw[i] for i in range(len(raw))]
    item = max(items, key=lambda it: int(it["id"].rsplit("_", 1)[1]))  # a later turn: with history
    pairs, _ = group_exchanges([t for t in turns if t["dialogue_id"] == item["dialogue_id"]])
    k = next(j for j, (_, a) in enumerate(pairs) if a["id"] == item["id"])
    wavs = [asr_example(q)["audio"] for q, _ in pairs[: k + 1]]
    expected = answer_hidden_states(model, tok, wavs, [a["text"] for _, a in pairs[:k]], item["ids"].tolist())
    torch.testing.assert_close(torch.from_numpy(item["hidden"].astype(np.float32)), expected, atol=2e-2, rtol=1e-2)


# ---------------------------------------------------------------------------------------------- training


def test_learns_beats_mean_baseline_and_round_trips(prepared, stage1_export, keomni_export, decoder_work, tmp_path):
    rec = LossRecorder()
    model, data, trainer = make(prepared, stage1_export, keomni_export, decoder_work, tmp_path, 40, [rec, Export()])
    trainer.fit(model, data)
    first, last = np.mean([rec.losses[s] for s in (1, 2, 3)]), np.mean([rec.losses[s] for s in (38, 39, 40)])
    assert last < 0.5 * first, (first, last)
    m = trainer.callback_metrics
    for key in ("val/mae_frames", "val/baseline_mae_frames", "val/total_error_frames",
                "val/baseline_total_error_frames"):
        assert key in m, key
    assert model.mean_duration == pytest.approx(decoder_work["stamp"]["baselines"]["mean_duration"])

    loaded, meta = load_duration(tmp_path / "export")
    assert meta["kind"] == "duration" and meta["hidden_size"] == 64 and meta["num_units"] == 16
    assert meta["llm_fingerprint"] == decoder_work["stamp"]["llm_fingerprint"] and meta["speaker"] is None
    h, mask = torch.randn(2, 7, 64), torch.tensor([[1] * 7, [1] * 4 + [0] * 3]).bool()
    with torch.no_grad():
        out = loaded(h, mask)
        torch.testing.assert_close(out, model.model.cpu().eval()(h, mask))
    assert (out >= 0).all() and (out[1, 4:] == 0).all()


def test_resume_gives_identical_next_losses(prepared, stage1_export, keomni_export, decoder_work, tmp_path):
    full = LossRecorder()
    model, data, trainer = make(prepared, stage1_export, keomni_export, decoder_work, tmp_path / "a", 5, [full])
    trainer.fit(model, data)
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "b", save_last=True, save_top_k=0,
                                               every_n_train_steps=2)
    model, data, trainer = make(prepared, stage1_export, keomni_export, decoder_work, tmp_path / "b", 5,
                                [LossRecorder(stop_at=2), ckpt])
    trainer.fit(model, data)
    resumed = LossRecorder()
    model, data, trainer = make(prepared, stage1_export, keomni_export, decoder_work, tmp_path / "c", 5, [resumed])
    trainer.fit(model, data, ckpt_path=str(tmp_path / "b" / "last.ckpt"))
    assert sorted(resumed.losses) == [3, 4, 5]
    for step in resumed.losses:
        assert resumed.losses[step] == pytest.approx(full.losses[step], rel=1e-5), step


# ---------------------------------------------------------------------------------------------- handoff


def test_handoff_errors_name_file_and_field(prepared, stage1_export, keomni_export, decoder_work, tmp_path):
    predictor = DurationPredictor(64, TransformerConfig.from_name("tiny", **DECODER_TINY))
    fields = {"hidden_size": 64, "llm_fingerprint": "x", "num_units": 16, "frame_rate": 12.5, "units_fingerprint": "y"}
    write_export(tmp_path / "d", kind="unit_generator", config=predictor.config.to_dict(),
                 state_dict=predictor.state_dict(), extra=fields)
    with pytest.raises(ValueError, match=r"d/config.json: field 'kind' is 'unit_generator', expected 'duration'"):
        load_duration(tmp_path / "d")
    write_export(tmp_path / "d", kind="duration", config=predictor.config.to_dict(),
                 state_dict=predictor.state_dict(), extra=fields)
    with pytest.raises(ValueError, match=r"d/config.json: field 'hidden_size' is 64, expected 256"):
        load_duration(tmp_path / "d", {"hidden_size": 256})
    write_export(tmp_path / "d", kind="duration", config=predictor.config.to_dict(),
                 state_dict=predictor.state_dict(), extra={k: v for k, v in fields.items() if k != "frame_rate"})
    with pytest.raises(ValueError, match=r"d/config.json: field 'frame_rate' missing"):
        load_duration(tmp_path / "d")
    # features of another LLM than the model's: one error naming the stamp and the field
    model, data, trainer = make(prepared, stage1_export, keomni_export, decoder_work, tmp_path, 1, [])
    model.configure_model()
    with pytest.raises(ValueError, match=r"decoder.json: field 'hidden_size' is 64"):
        data.check_handoff({**model.handoff, "hidden_size": 256})
    with pytest.raises(ValueError, match=r"no agent turns of speaker 'nobody' \(field 'speaker'"):
        data_module(prepared, stage1_export, keomni_export, decoder_work, speaker="nobody").prepare_data()


# ---------------------------------------------------------------------------------------------- recipes


def test_cpu_recipe_chains_the_stages(capsys, monkeypatch):
    cfg = printed(ROOT / "recipes" / "stage5.yaml", capsys, monkeypatch)
    m, d = cfg["model"]["init_args"], cfg["data"]["init_args"]
    assert m["llm_from"] == d["llm_from"] == "checkpoints/stage4_keomni/export"
    assert m["units_from"] == d["units_from"] == "checkpoints/stage1/export"
    assert m["export_dir"] == "checkpoints/stage5/export" and cfg["trainer"]["default_root_dir"] == "checkpoints/stage5"


def test_paper_recipe(capsys, monkeypatch):
    cfg = printed(ROOT / "recipes" / "paper" / "stage5.yaml", capsys, monkeypatch)
    m, d, t = cfg["model"]["init_args"], cfg["data"]["init_args"], cfg["trainer"]
    assert m["lr"] == 1e-4 and t["max_epochs"] == 5 and t["precision"] == "bf16-mixed"
    mesh = t["strategy"]["init_args"]
    assert mesh["data_parallel_size"] * d["batch_size"] * t["accumulate_grad_batches"] == 256
    assert t["callbacks"][-1]["class_path"] == "lit_keomni.checkpoints.Export"
    with torch.device("meta"):  # Llama-3.1-8B's hidden size 4096 in
        predictor = DurationPredictor(4096, TransformerConfig.from_name(m["config"], **(m["overrides"] or {})))
    assert predictor.proj.in_features == 4096 and not predictor.config.causal
    assert sum(p.numel() for p in predictor.parameters()) < 1e9


@pytest.mark.parametrize("kind", ["duration", "unit_generator"])
def test_compile_option_compiles_each_block(kind, stage1_export, keomni_export):
    from lit_keomni.stages.unit_generator import UnitGeneratorStage

    cls = DurationStage if kind == "duration" else UnitGeneratorStage
    stages = [cls(config="tiny", overrides=DECODER_TINY, llm_from=str(keomni_export), units_from=str(stage1_export),
                  compile=c) for c in (False, True)]
    for stage in stages:
        stage.configure_model()
    compiled = [[getattr(b, "_compiled_call_impl", None) is not None for b in s.model.net.blocks] for s in stages]
    assert compiled[1] and all(compiled[1]) and not any(compiled[0])
