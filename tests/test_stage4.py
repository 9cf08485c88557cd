"""Stage 4 on tiny models: the KE-Omni adapter and speech slots, dialogue data and loss masks of both modes, learning,
the frozen encoder, export round trips, exact resume, paper recipes."""

import json
import shutil
import unicodedata
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from datamodules.sft import SFTDataModule, group_exchanges
from lit_keomni.checkpoints import AtomicCheckpointIO, Export, lm_tokenizer, load_keomni, load_lm, write_export
from lit_keomni.configs import SpeechTokenizerConfig, TransformerConfig, config_dict
from lit_keomni.nn.adapter import SpeechAdapter, speech_frames
from lit_keomni.nn.keomni import KeOmni
from lit_keomni.nn.transformer import Transformer
from lit_keomni.nn.whisper import SpeechEncoder
from lit_keomni.stages.sft import SFT, load_speech_encoder
from lit_keomni.text.templates import (ASSISTANT, GLM_STREAMING_PROMPT, KEOMNI_SYSTEM_PROMPT,
                                       KEOMNI_TRANSCRIBE_PROMPT, USER, Exchange, glm_dialogue, interleave_answer,
                                       speech_string, split_answer)
from tests.test_paper_recipes import printed

ROOT = Path(__file__).resolve().parent.parent
TINY_LM = {"n_layer": 2, "n_embd": 64, "n_head": 4, "n_kv_head": 2, "intermediate_size": 172, "block_size": 512}
ENCODER = dict(d_model=32, n_head=4, ffn_dim=64, encoder_layers=2, vq_position=2, decoder_layers=0, pool=4,
               max_source_positions=1500, vq=False)


class LossRecorder(L.Callback):
    def __init__(self, stop_at=None):
        self.losses, self.stop_at = {}, stop_at

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses[trainer.global_step] = float(outputs["loss"])
        if self.stop_at is not None and trainer.global_step >= self.stop_at:
            trainer.should_stop = True


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Speech tokens and SFT chunks shared by this module's tests (built by the first data module that needs them)."""
    return tmp_path_factory.mktemp("stage4")


def data_module(mode, prepared, stage1_export, work, **kw):
    args = dict(speech_export=str(stage1_export), tokens_dir=str(work / "tokens"), sft_dir=str(work / "sft"),
                data_dir=str(prepared), batch_size=4, num_workers=0, max_length=512)
    return SFTDataModule(mode=mode, **{**args, **kw})


def make(mode, prepared, stage1_export, work, tmp_path, max_steps, callbacks, data_kw=None, **kw):
    L.seed_everything(5)
    args = {"init_from": None, "speech_export": str(stage1_export), "encoder_from": str(stage1_export),
            "warmup_steps": 2, "lr": 3e-3, "max_answer_tokens": 8, "export_dir": str(tmp_path / "export"), **kw}
    model = SFT(mode=mode, config="tiny", overrides=TINY_LM, **args)
    data = data_module(mode, prepared, stage1_export, work, **(data_kw or {}))
    trainer = L.Trainer(accelerator="cpu", max_steps=max_steps, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=1,
                        val_check_interval=max_steps, check_val_every_n_epoch=None, callbacks=callbacks,
                        default_root_dir=str(tmp_path), plugins=[AtomicCheckpointIO()])
    return model, data, trainer


def tiny_keomni(stack=5, **encoder) -> KeOmni:
    torch.manual_seed(0)
    enc = SpeechEncoder(SpeechTokenizerConfig(**{**ENCODER, **encoder}))
    llm = Transformer(TransformerConfig.from_name("tiny", **TINY_LM))
    return KeOmni(enc, SpeechAdapter(32, 64, stack=stack, hidden=48), llm).eval()


# ---------------------------------------------------------------------------------------------- adapter and slots


def test_adapter_turns_50hz_into_10hz():
    torch.manual_seed(0)
    adapter = SpeechAdapter(8, 6, stack=5, hidden=12)
    x = torch.randn(2, 23, 8)
    out, lengths = adapter(x, torch.tensor([23, 11]))
    assert out.shape == (2, 4, 6) and lengths.tolist() == [4, 2]  # the incomplete tail (3 frames) is dropped
    for b in range(2):
        for j in range(4):
            stacked = torch.cat([x[b, 5 * j + i] for i in range(5)])  # frames in time order
            ref = adapter.linear2(torch.relu(adapter.linear1(stacked)))
            torch.testing.assert_close(out[b, j], ref)


@pytest.mark.parametrize("encoder", [dict(), dict(pool=1, causal_conv=False, block_seconds=None)])
def test_frame_count_rule_matches_the_model(encoder):
    model = tiny_keomni(**encoder)
    samples = [800, 959, 1600, 1601, 4321, 16000, 16159, 33333]
    wavs = [torch.randn(n) * 0.1 for n in samples]
    mels, mel_lengths = model.features(wavs)
    frames, lengths = model.encode(mels, mel_lengths)
    assert lengths.tolist() == [speech_frames(n, 5) for n in samples] == [model.speech_frames(n) for n in samples]
    assert frames.shape[1] == max(lengths.tolist())
    # alone, each clip gives the same count (padding in a batch never adds a frame)
    for n, w in zip(samples, wavs):
        assert model.encode(*model.features([w]))[1].item() == speech_frames(n, 5)


def test_speech_slots_are_replaced_in_order():
    model = tiny_keomni()
    wavs = [torch.randn(n) * 0.1 for n in (4000, 2500, 6000)]  # row 0: turns 0, 1; row 1: turn 2
    counts = [speech_frames(len(w), 5) for w in wavs]
    ids = torch.randint(5, 100, (2, 40))
    slot = torch.zeros(2, 40, dtype=torch.bool)
    slot[0, 2 : 2 + counts[0]] = True
    slot[0, 20 : 20 + counts[1]] = True
    slot[1, 5 : 5 + counts[2]] = True
    seen = {}
    model.llm.register_forward_pre_hook(lambda m, a, kw: seen.update(x=kw["inputs_embeds"]), with_kwargs=True)
    mels, mel_lengths = model.features(wavs)
    with torch.no_grad():
        logits = model(ids, slot, mels, mel_lengths)
        frames, lengths = model.encode(mels, mel_lengths)
    x = seen["x"]
    torch.testing.assert_close(x[0, 2 : 2 + counts[0]], frames[0, : counts[0]])
    torch.testing.assert_close(x[0, 20 : 20 + counts[1]], frames[1, : counts[1]])
    torch.testing.assert_close(x[1, 5 : 5 + counts[2]], frames[2, : counts[2]])
    torch.testing.assert_close(x[~slot], model.llm.embed(ids)[~slot])
    assert logits.shape == (2, 40, model.llm.config.padded_vocab_size)
    slot[1, 4] = True  # one slot too many: a clear error, not a silent shift
    with pytest.raises(ValueError, match="speech slots"):
        model(ids, slot, mels, mel_lengths)


def test_group_exchanges_counts_unpaired_turns():
    turns = [dict(id=str(i), turn=i, role=r) for i, r in enumerate(["agent", "user", "user", "agent", "user"])]
    pairs, unpaired = group_exchanges(list(reversed(turns)))
    assert [(q["turn"], a["turn"]) for q, a in pairs] == [(2, 3)] and unpaired == 3


# ---------------------------------------------------------------------------------------------- data and loss masks


def nfkc(text):
    return unicodedata.normalize("NFKC", text)


def trained_runs(target):
    """Contiguous runs of trained target ids of one row."""
    runs, cur = [], []
    for t in target.tolist():
        if t == -100:
            if cur:
                runs.append(cur)
            cur = []
        else:
            cur.append(t)
    return runs + ([cur] if cur else [])


def test_discrete_loss_mask_is_assistant_only(prepared, stage1_export, work, tmp_path):
    dm = data_module("discrete", prepared, stage1_export, work)
    dm.prepare_data()
    dm.setup()
    counts = json.loads((work / "sft" / "discrete" / "sft.json").read_text())["counts"]
    assert counts["train"]["dropped_dialogues"] == 0 and counts["train"]["exchanges"] > counts["train"]["dialogues"]
    tok = dm.tokenizer
    codes = {}
    from litdata import StreamingDataset

    for split in ("train", "val"):
        ds = StreamingDataset(str(work / "tokens" / "chunks" / split))
        for i in range(len(ds)):
            it = ds[i]
            codes[(it["dialogue_id"], it["text"])] = it["codes"].tolist()
    batch = next(iter(dm.train_dataloader()))
    for row, (did, answers) in enumerate(zip(batch["id"], batch["answers"])):
        runs = [tok.decode(r, skip_special=False) for r in trained_runs(batch["target"][row])]
        # the tokenizer normalises text with NFKC (full-width punctuation becomes ASCII)
        expected = [f"{nfkc(a)}\n{ASSISTANT}\n{speech_string(codes[(did, a)])}" for a in answers]
        assert runs == expected
    assert (batch["input"][:, 0] == tok.token_to_id("<|system|>")).all()

    direct = data_module("discrete", prepared, stage1_export, work, template="direct", sft_dir=str(tmp_path / "sft"))
    direct.prepare_data()
    direct.setup()
    batch = next(iter(direct.train_dataloader()))
    for row, (did, answers) in enumerate(zip(batch["id"], batch["answers"])):
        runs = [tok.decode(r, skip_special=False) for r in trained_runs(batch["target"][row])]
        assert runs == [speech_string(codes[(did, a)]) for a in answers]

    streaming = data_module("discrete", prepared, stage1_export, work, template="streaming",
                            sft_dir=str(tmp_path / "sft_streaming"))
    streaming.prepare_data()
    streaming.setup()
    batch = next(iter(streaming.train_dataloader()))
    user = tok.token_to_id(USER)
    for row, (did, answers) in enumerate(zip(batch["id"], batch["answers"])):
        runs = trained_runs(batch["target"][row])
        assert len(runs) == len(answers)
        for run, a in zip(runs, answers):  # text and speech interleaved 13:26, then <|user|>
            assert run[-1] == user
            text, speech = split_answer(tok, run[:-1])
            assert tok.decode(text) == nfkc(a) and speech == codes[(did, a)]
            kinds = "".join("s" if i >= tok.audio_token_offset else "t" for i in run[:-1])
            assert kinds.startswith("t" * min(13, len(text)) + "s" * min(26, len(speech)))
    assert tok.decode(batch["input"][0].tolist(), skip_special=False).startswith(
        f"<|system|>\n{GLM_STREAMING_PROMPT}<|user|>\n<|begin_of_audio|>")


def test_interleave_answer_alternates_13_text_and_26_speech_tokens():
    text, speech = list(range(20)), [100 + i for i in range(60)]
    assert interleave_answer(text, speech) == [*range(13), *range(100, 126), *range(13, 20), *range(126, 160)]
    assert interleave_answer(list(range(30)), [100]) == [*range(13), 100, *range(13, 26), *range(26, 30)]
    assert interleave_answer([], []) == []


def test_streaming_prompt_is_the_released_one(stage1_export):
    tok, _ = lm_tokenizer(stage1_export)
    ids, mask = glm_dialogue(tok, [Exchange(user_codes=[3, 1]), ], "streaming")
    assert not any(mask)
    assert tok.decode(ids, skip_special=False) == (f"<|system|>\n{GLM_STREAMING_PROMPT}<|user|>\n<|begin_of_audio|>"
                                                   "<|audio_3|><|audio_1|><|end_of_audio|><|assistant|>"
                                                   "streaming_transcription\n")
    two, mask = glm_dialogue(tok, [Exchange(user_codes=[3], text="hi", codes=[5]), Exchange(user_codes=[2])],
                             "streaming")
    user = [i for i, t in enumerate(two) if t == tok.token_to_id(USER)][1]  # the first answer ends with <|user|> ...
    answer = [*tok.encode("hi"), *tok.speech_to_ids([5]), tok.token_to_id(USER)]
    assert two[user - len(answer) + 1: user + 1] == answer and all(mask[user - len(answer) + 1: user + 1])
    # ... which opens the second user turn
    assert tok.decode(two[user:], skip_special=False).replace(" ", "") == (
        "<|user|>\n<|begin_of_audio|><|audio_2|><|end_of_audio|><|assistant|>streaming_transcription\n")
    assert not any(mask[user + 1:])


def test_continuous_loss_mask_is_assistant_only(prepared, stage1_export, work):
    dm = data_module("continuous", prepared, stage1_export, work)
    dm.prepare_data()
    dm.setup()
    tok = dm.tokenizer
    batch = next(iter(dm.train_dataloader()))
    for row, answers in enumerate(batch["answers"]):
        runs = [tok.decode(r, skip_special=False) for r in trained_runs(batch["target"][row])]
        assert runs == [f"{nfkc(a)}<|eos|>" for a in answers]
        turns = (batch["turn_row"] == row).nonzero().flatten().tolist()
        assert len(turns) == len(answers)
        slots = int(batch["speech_mask"][row].sum())
        assert slots == sum(speech_frames(int(batch["audio_lengths"][t]), 5) for t in turns)
        assert (batch["input"][row][batch["speech_mask"][row]] == tok.pad_id).all()
    assert not ((batch["target"] != -100) & torch.nn.functional.pad(batch["speech_mask"][:, 1:], (0, 1))).any()


def test_transcript_target_is_one_sequence_per_user_turn(prepared, stage1_export, work):
    from litdata import StreamingDataset

    dm = data_module("continuous", prepared, stage1_export, work, target="transcript")
    dm.prepare_data()
    dm.setup()
    tok = dm.tokenizer
    ds = StreamingDataset(str(prepared / "chunks" / "train"))
    turns = [ds[i] for i in range(len(ds))]
    by_dialogue = {}
    for t in turns:
        by_dialogue.setdefault(t["dialogue_id"], []).append(t)
    users = {q["text"] for d in by_dialogue.values() for q, _ in group_exchanges(d)[0]}
    counts = json.loads((work / "sft" / "continuous_transcript" / "sft.json").read_text())["counts"]["train"]
    assert counts["dialogues"] == counts["exchanges"] == len(users)  # one sequence per answered user turn
    seen = set()
    for batch in dm.train_dataloader():
        for row, answers in enumerate(batch["answers"]):
            assert len(answers) == 1 and answers[0] in users
            seen.add(answers[0])
            runs = [tok.decode(r, skip_special=False) for r in trained_runs(batch["target"][row])]
            assert runs == [f"{nfkc(answers[0])}<|eos|>"]
            prompt = tok.decode(batch["input"][row].tolist(), skip_special=False)
            assert KEOMNI_TRANSCRIBE_PROMPT in prompt and KEOMNI_SYSTEM_PROMPT not in prompt
            assert int(batch["speech_mask"][row].sum()) == speech_frames(int(batch["audio_lengths"][row]), 5)
    assert len(seen) >= len(users) - 3  # all but the last incomplete batch (drop_last)
    with pytest.raises(ValueError, match="target='transcript' is for the continuous mode"):
        data_module("discrete", prepared, stage1_export, work, target="transcript")
    with pytest.raises(ValueError, match="target must be one of"):
        SFT(mode="continuous", target="summary")


def test_transcript_fraction_mixes_transcripts_into_the_dialogues(prepared, stage1_export, work):
    dm = data_module("continuous", prepared, stage1_export, work, transcript_fraction=0.5)
    dm.prepare_data()
    dm.setup()
    tok = dm.tokenizer
    kinds = []
    for batch in dm.train_dataloader():
        for row in range(batch["input"].shape[0]):
            prompt = tok.decode(batch["input"][row].tolist(), skip_special=False)
            kinds.append(KEOMNI_TRANSCRIBE_PROMPT in prompt)
            assert (KEOMNI_SYSTEM_PROMPT in prompt) != kinds[-1]
    share = sum(kinds) / len(kinds)
    assert len(kinds) >= 8 and 0.2 <= share <= 0.8, (len(kinds), share)
    val = next(iter(dm.val_dataloader()))  # validation stays on the dialogues
    assert all(KEOMNI_SYSTEM_PROMPT in tok.decode(r.tolist(), skip_special=False) for r in val["input"])
    with pytest.raises(ValueError, match="transcript_fraction=1.0 must be in"):
        data_module("continuous", prepared, stage1_export, work, transcript_fraction=1.0)
    with pytest.raises(ValueError, match="transcript_fraction mixes transcripts into continuous-mode answers"):
        data_module("discrete", prepared, stage1_export, work, transcript_fraction=0.2)


def test_too_long_dialogues_are_cut_to_whole_exchanges(prepared, stage1_export, tmp_path):
    dm = data_module("continuous", prepared, stage1_export, tmp_path, max_length=115)
    dm.prepare_data()
    counts = json.loads((tmp_path / "sft" / "continuous" / "sft.json").read_text())["counts"]["train"]
    assert counts["truncated_dialogues"] > 0 and counts["longest"] <= 115
    assert counts["dropped_exchanges"] >= counts["truncated_dialogues"]


# ---------------------------------------------------------------------------------------------- training


def test_discrete_learns_exports_and_round_trips(prepared, stage1_export, work, tmp_path):
    rec = LossRecorder()
    model, data, trainer = make("discrete", prepared, stage1_export, work, tmp_path, 20, [rec, Export()])
    trainer.fit(model, data)
    first, last = np.mean([rec.losses[s] for s in (1, 2, 3)]), np.mean([rec.losses[s] for s in (18, 19, 20)])
    assert last < 0.8 * first, (first, last)
    assert "val/assistant_acc" in trainer.callback_metrics
    loaded, tok, meta = load_lm(tmp_path / "export")
    assert meta["stage"] == "sft" and meta["template"] == "text_guided"
    assert meta["speech_tokenizer"]["codebook_size"] == 16 and tok.num_audio_tokens == 16
    x = torch.randint(0, tok.vocab_size, (2, 12))
    torch.testing.assert_close(loaded(x), model.model.cpu().eval()(x))


def test_continuous_learns_with_frozen_encoder_and_round_trips(prepared, stage1_export, work, tmp_path):
    rec = LossRecorder()

    class Watch(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            assert not pl_module.model.encoder.training and pl_module.model.adapter.training

        def on_after_backward(self, trainer, pl_module):
            assert all(p.grad is None for p in pl_module.model.encoder.parameters())
            assert all(p.grad is not None for p in pl_module.model.adapter.parameters())

    model, data, trainer = make("continuous", prepared, stage1_export, work, tmp_path, 20, [rec, Watch(), Export()])
    model.configure_model()
    encoder0 = {k: v.clone() for k, v in model.model.encoder.state_dict().items()}
    adapter0 = {k: v.clone() for k, v in model.model.adapter.state_dict().items()}
    trainer.fit(model, data)
    first, last = np.mean([rec.losses[s] for s in (1, 2, 3)]), np.mean([rec.losses[s] for s in (18, 19, 20)])
    assert last < 0.8 * first, (first, last)
    for k, v in model.model.encoder.state_dict().items():
        assert torch.equal(v, encoder0[k]), k
    assert all(not torch.equal(v, adapter0[k]) for k, v in model.model.adapter.state_dict().items())
    optimised = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert not optimised & {id(p) for p in model.model.encoder.parameters()}
    assert "val/answer_cer" in trainer.callback_metrics

    loaded, tok, meta = load_keomni(tmp_path / "export")
    assert meta["kind"] == "keomni_lm" and loaded.adapter.stack == 5
    wavs = [torch.randn(n) * 0.1 for n in (8000, 12000)]
    ids = torch.full((2, 30), tok.token_to_id("<|user|>"))
    slot = torch.zeros(2, 30, dtype=torch.bool)
    slot[0, 3 : 3 + speech_frames(8000, 5)] = True
    slot[1, 1 : 1 + speech_frames(12000, 5)] = True
    ours = model.model.cpu().eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, slot, *loaded.features(wavs)), ours(ids, slot, *ours.features(wavs)))
    answers = loaded.respond(tok, wavs, max_new_tokens=6, history=[[], [(wavs[0], "Sam lives here.")]])
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)


@pytest.mark.parametrize("stop, steps", [(1, 3), (2, 4)], ids=["same-epoch", "next-epoch"])
def test_resume_gives_identical_next_losses(stop, steps, prepared, stage1_export, work, tmp_path):
    # 13 training dialogues, batch 4, drop_last: 3 steps per epoch
    full = LossRecorder()
    model, data, trainer = make("continuous", prepared, stage1_export, work, tmp_path / "a", steps, [full])
    trainer.fit(model, data)
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "b", save_last=True, save_top_k=0,
                                               every_n_train_steps=stop)
    model, data, trainer = make("continuous", prepared, stage1_export, work, tmp_path / "b", steps,
                                [LossRecorder(stop_at=stop), ckpt])
    trainer.fit(model, data)
    resumed = LossRecorder()
    model, data, trainer = make("continuous", prepared, stage1_export, work, tmp_path / "c", steps, [resumed])
    trainer.fit(model, data, ckpt_path=str(tmp_path / "b" / "last.ckpt"))
    assert sorted(resumed.losses) == list(range(stop + 1, steps + 1))
    for step in resumed.losses:
        assert resumed.losses[step] == pytest.approx(full.losses[step], rel=1e-5), step


def test_starts_from_a_speech_lm_export(stage1_export, tmp_path):
    tok, meta = lm_tokenizer(stage1_export)
    torch.manual_seed(1)
    lm = Transformer(TransformerConfig.from_name("tiny", **TINY_LM).replace(vocab_size=tok.vocab_size))
    speech = {"frame_rate_hz": meta["frame_rate_hz"], "codebook_size": meta["codebook_size"]}
    write_export(tmp_path / "stage3", kind="speech_lm", config=config_dict(lm.config), state_dict=lm.state_dict(),
                 extra={"speech_tokenizer": speech}, files={"tokenizer": tok.save})
    for mode in ("discrete", "continuous"):
        model = SFT(mode=mode, init_from=str(tmp_path / "stage3"), speech_export=str(stage1_export),
                    encoder_from=str(stage1_export), overrides={"block_size": 300})
        model.configure_model()
        assert model.llm.config.block_size == 300 and model.speech_meta == speech
        for k, v in lm.state_dict().items():
            assert torch.equal(model.llm.state_dict()[k], v), k


def test_alignment_then_sft_continues_from_the_keomni_export(prepared, stage1_export, work, tmp_path):
    """Adapter alignment (LLM frozen, transcript target) exports; SFT starts from its LLM and adapter."""
    model, data, trainer = make("continuous", prepared, stage1_export, work, tmp_path / "align", 4, [Export()],
                                data_kw={"target": "transcript"}, freeze_llm=True, target="transcript")
    model.configure_model()
    llm0 = {k: v.clone() for k, v in model.model.llm.state_dict().items()}
    adapter0 = {k: v.clone() for k, v in model.model.adapter.state_dict().items()}
    trainer.fit(model, data)
    assert all(torch.equal(v, llm0[k]) for k, v in model.model.llm.state_dict().items())
    assert all(not torch.equal(v, adapter0[k]) for k, v in model.model.adapter.state_dict().items())
    assert "val/answer_cer" in trainer.callback_metrics
    export = tmp_path / "align" / "export"
    assert load_keomni(export)[2]["target"] == "transcript"

    sft = SFT(mode="continuous", init_from=str(export), speech_export=str(stage1_export),
              encoder_from=str(stage1_export), overrides={**TINY_LM, "block_size": 300})
    sft.configure_model()
    assert sft.llm.config.block_size == 300
    for part in ("adapter", "llm"):
        ours = getattr(sft.model, part).state_dict()
        for k, v in getattr(model.model, part).state_dict().items():
            assert torch.equal(ours[k], v), (part, k)
    assert all(p.requires_grad for p in sft.model.adapter.parameters()) and sft.model.llm.training

    with pytest.raises(ValueError, match="field 'target' is 'transcript': an adapter-alignment export"):
        load_keomni(export, answers=True)  # chat, spoken-qa and the stage-5 features need an answering model

    copy = tmp_path / "same_encoder_elsewhere"
    shutil.copytree(stage1_export, copy)
    SFT(mode="continuous", init_from=str(export), speech_export=str(stage1_export), encoder_from=str(copy),
        overrides=TINY_LM).configure_model()  # the same weights at another path are the same encoder
    other = tmp_path / "other_encoder"
    shutil.copytree(stage1_export, other)
    weights = load_file(other / "model.safetensors")
    name = next(k for k in weights if k.startswith("encoder.") and weights[k].is_floating_point())
    save_file({**weights, name: weights[name] + 1.0}, other / "model.safetensors")
    with pytest.raises(ValueError, match=r"its encoder is not model.encoder_from .* trained on another encoder"):
        SFT(mode="continuous", init_from=str(export), speech_export=str(stage1_export),
            encoder_from=str(other), overrides=TINY_LM).configure_model()
    with pytest.raises(ValueError, match="the adapter stacks 5 frames, but model.stack is 4"):
        SFT(mode="continuous", init_from=str(export), speech_export=str(stage1_export),
            encoder_from=str(stage1_export), overrides=TINY_LM, stack=4).configure_model()
    model, _, trainer = make("continuous", prepared, stage1_export, work, tmp_path / "mismatch", 1, [])
    with pytest.raises(ValueError, match="data.target is 'transcript' but model.target is 'answer'"):
        trainer.fit(model, data_module("continuous", prepared, stage1_export, work, target="transcript"))


def test_data_and_model_must_agree(prepared, stage1_export, work, tmp_path):
    model, _, trainer = make("continuous", prepared, stage1_export, work, tmp_path, 1, [])
    with pytest.raises(ValueError, match="data.stack is 4 but model.stack is 5"):
        trainer.fit(model, data_module("continuous", prepared, stage1_export, tmp_path, stack=4))
    model, _, trainer = make("discrete", prepared, stage1_export, work, tmp_path, 1, [])
    with pytest.raises(ValueError, match="data.mode is 'continuous' but model.mode is 'discrete'"):
        trainer.fit(model, data_module("continuous", prepared, stage1_export, work))


def test_load_keomni_errors_name_the_file(tmp_path):
    model = tiny_keomni()
    cfg = model.config_dict()
    del cfg["adapter"]
    write_export(tmp_path / "bad", kind="keomni_lm", config=cfg, state_dict=model.state_dict())
    with pytest.raises(ValueError, match=r"bad/config.json: field 'config.adapter' missing"):
        load_keomni(tmp_path / "bad")
    write_export(tmp_path / "lm", kind="speech_lm", config=cfg, state_dict={})
    with pytest.raises(ValueError, match="field 'kind' is 'speech_lm', expected 'keomni_lm'"):
        load_keomni(tmp_path / "lm")


def test_hf_whisper_encoder_parity(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf_cfg = transformers.WhisperConfig(d_model=64, encoder_layers=2, decoder_layers=1, encoder_attention_heads=4,
                                        decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128,
                                        num_mel_bins=80, vocab_size=100, max_source_positions=50,
                                        max_target_positions=32, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                        decoder_start_token_id=1)
    hf = transformers.WhisperModel(hf_cfg).eval()
    hf.save_pretrained(tmp_path)
    encoder = load_speech_encoder(tmp_path).eval()
    mel = torch.randn(2, 80, 100)
    with torch.no_grad():
        ref = hf.encoder(mel).last_hidden_state
        ours, lengths = encoder.frames_50hz(mel, torch.tensor([100, 100]))
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
    assert lengths.tolist() == [50, 50]


# ---------------------------------------------------------------------------------------------- recipes


@pytest.mark.parametrize("name, mode, global_batch, lr, min_ratio, epochs", [
    ("stage4", "discrete", 64, 5e-5, 0.1, 10), ("stage4_keomni", "continuous", 256, 1e-4, None, 5)])
def test_paper_recipes(name, mode, global_batch, lr, min_ratio, epochs, capsys, monkeypatch):
    cfg = printed(ROOT / "recipes" / "paper" / f"{name}.yaml", capsys, monkeypatch)
    m, d, t = cfg["model"]["init_args"], cfg["data"]["init_args"], cfg["trainer"]
    assert m["mode"] == d["mode"] == mode and m["lr"] == lr and t["max_epochs"] == epochs
    if min_ratio is not None:
        assert m["min_lr_ratio"] == min_ratio and m["decay"] == "linear"
    mesh = t["strategy"]["init_args"]
    assert mesh["data_parallel_size"] == t["num_nodes"] * t["devices"]
    assert mesh["data_parallel_size"] * d["batch_size"] * t["accumulate_grad_batches"] == global_batch
    llm = TransformerConfig.from_name(m["config"], **(m["overrides"] or {}))
    if mode == "discrete":
        assert m["config"] == "glm-4-voice-9b" and d["max_length"] == 4096 and llm.block_size >= 4096
    else:
        assert m["config"] == "llama-3.1-8b" and m["stack"] == d["stack"] == 5 and m["tokenizer"] == d["tokenizer"]


@pytest.mark.parametrize("name, init_from, encoder_from, target", [
    ("stage4", "checkpoints/stage3/export", None, "answer"),
    ("stage4_keomni_align", "checkpoints/stage3/export", "checkpoints/asr/export", "transcript"),
    ("stage4_keomni", "checkpoints/stage4_keomni_align/export", "checkpoints/asr/export", "answer")])
def test_cpu_recipes_chain_the_stages(name, init_from, encoder_from, target, capsys, monkeypatch):
    cfg = printed(ROOT / "recipes" / f"{name}.yaml", capsys, monkeypatch)
    m, d = cfg["model"]["init_args"], cfg["data"]["init_args"]
    assert m["init_from"] == init_from and m["mode"] == d["mode"] and m["target"] == d["target"] == target
    assert m["export_dir"] == f"checkpoints/{name}/export" and cfg["trainer"]["default_root_dir"] == f"checkpoints/{name}"
    assert d["max_length"] <= TransformerConfig.from_name(m["config"], **m["overrides"]).block_size
    if encoder_from:
        assert m["encoder_from"] == encoder_from and not m["freeze_llm"]
