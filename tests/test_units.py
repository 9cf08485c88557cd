"""HuBERT k-means units: k-means on known clusters, HuBERT layer features, fit -> export -> apply, and bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from lit_keomni import units as U  # noqa: E402
from lit_keomni.checkpoints import unit_meta  # noqa: E402

TINY_HUBERT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                   conv_dim=(16, 16), conv_kernel=(10, 64), conv_stride=(5, 64), num_conv_pos_embeddings=16,
                   num_conv_pos_embedding_groups=4)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread is several times faster than two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def save_hubert(folder: Path, seed: int = 0, **overrides) -> Path:
    torch.manual_seed(seed)
    transformers.HubertModel(transformers.HubertConfig(**{**TINY_HUBERT, **overrides})).save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def hubert(tmp_path_factory) -> Path:
    return save_hubert(tmp_path_factory.mktemp("hubert") / "tiny-hubert")


@pytest.fixture(scope="module")
def units_export(hubert, prepared, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("units") / "export"
    meta = U.fit_units(hubert, prepared, out, layer=1, k=8, max_frames=3000, seed=3, device="cpu")
    return out, meta


def blobs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centers = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    labels = torch.randint(4, (400,), generator=g)
    return centers[labels] + 0.3 * torch.randn(400, 2, generator=g), labels, centers


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kmeans_recovers_known_clusters(seed):
    x, labels, centers = blobs(seed)
    km = U.kmeans(x, 4, seed=seed)
    ids, _ = U.assign(x, km.centroids)
    # each true cluster maps to exactly one found cluster and back
    pairs = {(int(a), int(b)) for a, b in zip(labels, ids)}
    assert len(pairs) == 4 and len({b for _, b in pairs}) == 4
    for true, found in pairs:
        # perfect assignments make each centroid the mean of its true cluster's points
        torch.testing.assert_close(km.centroids[found], x[labels == true].mean(0), atol=1e-4, rtol=0)
        torch.testing.assert_close(km.centroids[found], centers[true], atol=0.15, rtol=0)
    assert km.converged and km.counts.sum() == 400 and (km.counts > 0).all()
    assert km.inertia == pytest.approx(2 * 0.3**2, rel=0.25)
    assert torch.equal(U.kmeans(x, 4, seed=seed).centroids, km.centroids)  # deterministic for a seed


def test_kmeans_random_init_ends_at_a_lloyd_fixed_point():
    x, _, _ = blobs()
    km = U.kmeans(x, 4, init="random", seed=1, tol=0.0)
    ids, d2 = U.assign(x, km.centroids)
    assert km.converged and torch.equal(torch.bincount(ids, minlength=4), km.counts)
    for c in range(4):  # every centroid is the mean of the points assigned to it
        torch.testing.assert_close(km.centroids[c], x[ids == c].mean(0), atol=1e-4, rtol=0)
    assert km.inertia == pytest.approx(float(d2.mean()))
    assert km.inertia >= U.kmeans(x, 4, seed=1).inertia - 1e-6


def test_assign_in_small_blocks_matches_brute_force(monkeypatch):
    g = torch.Generator().manual_seed(0)
    x, c = torch.randn(97, 5, generator=g), torch.randn(7, 5, generator=g)
    monkeypatch.setattr(U, "MAX_DISTANCE_ELEMENTS", 20)  # 2 rows per block
    ids, d2 = U.assign(x, c)
    full = torch.cdist(x, c).pow(2)
    assert torch.equal(ids, full.argmin(1))
    torch.testing.assert_close(d2, full.min(1).values, atol=1e-4, rtol=1e-4)


def test_kmeans_refills_empty_clusters_and_rejects_too_few_frames():
    x = torch.tensor([[0.0, 0.0]] * 10 + [[5.0, 5.0]] * 10 + [[9.0, 0.0]])
    km = U.kmeans(x, 3, init="random", seed=0)
    assert (km.counts > 0).all()
    with pytest.raises(ValueError, match="cannot make k=30"):
        U.kmeans(x, 30)


def test_frame_sample_is_bounded_and_uniform():
    blocks = [torch.arange(i * 30, (i + 1) * 30, dtype=torch.float32)[:, None] for i in range(10)]
    sample = U.FrameSample(50, seed=0)
    for b in blocks:
        sample.add(b)
        assert sample.buffered <= 100
    rows = sample.frames()[:, 0]
    assert len(rows) == 50 and len(set(rows.tolist())) == 50 and sample.seen == 300
    assert rows.min() < 60 and rows.max() > 240  # drawn from the whole stream, not its start or end
    all_rows = U.FrameSample(None)
    for b in blocks:
        all_rows.add(b)
    assert len(all_rows.frames()) == 300


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_hubert_features_equal_the_full_model_hidden_state(hubert, layer):
    feats = U.HubertFeatures(hubert, layer)
    assert feats.frame_rate == 50.0 and feats.hop == 320 and feats.dim == 32
    model = transformers.HubertModel.from_pretrained(str(hubert), local_files_only=True).eval()
    wav = torch.randn(16000 * 3 // 4)
    with torch.no_grad():
        ref = model(wav[None], output_hidden_states=True).hidden_states[layer][0]
    out = feats([wav])[0]
    assert out.shape == (feats.num_frames(len(wav)), 32) == ref.shape
    torch.testing.assert_close(out, ref)
    assert feats([torch.randn(100)])[0].shape == (1, 32)  # shorter than one receptive field: one frame


def test_fit_writes_a_units_export_that_unit_meta_reads(units_export, hubert):
    out, meta = units_export
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["kind"] == "units"
    assert {k: cfg["config"][k] for k in ("num_units", "frame_rate", "layer", "hubert", "feature_dim")} == {
        "num_units": 8, "frame_rate": 50.0, "layer": 1, "hubert": "tiny-hubert", "feature_dim": 32}
    fit = cfg["fit"]
    assert fit["frames_fitted"] == min(3000, fit["frames_seen"]) and fit["inertia"] > 0 and 1 <= fit["used"] <= 8
    um = unit_meta(out)
    assert (um["kind"], um["num_units"], um["frame_rate"], um["sample_rate"]) == ("units", 8, 50.0, 16000)
    centroids, _ = U.load_units(out)
    assert centroids.shape == (8, 32) and torch.isfinite(centroids).all()


def test_apply_writes_codes_at_the_hubert_frame_rate(units_export, hubert, prepared, tmp_path):
    from litdata import StreamingDataset

    from datamodules.streaming import chunks_dir
    from datamodules.tokenizer import asr_example
    from lit_keomni.speech_tokens import tokens_are_current

    export, _ = units_export
    out = tmp_path / "units-data"
    stamp = U.apply_units(export, prepared, out, device="cpu")
    assert tokens_are_current(out, export) and stamp["codebook_size"] == 8 and stamp["frame_rate_hz"] == 50.0
    feats = U.HubertFeatures(hubert, 1)
    encoder = U.UnitEncoder(export, hubert, "cpu")
    for split in ("train", "val"):
        src = StreamingDataset(str(chunks_dir(prepared, split)))
        got = StreamingDataset(str(chunks_dir(out, split)))
        assert len(got) == len(src) == stamp["splits"][split]
        by_id = {src[i]["id"]: src[i] for i in range(len(src))}
        for i in range(0, len(got), max(1, len(got) // 5)):
            item = got[i]
            ref = by_id[item["id"]]
            assert set(item) == (set(ref) - {"audio"}) | {"codes"}
            assert item["text"] == ref["text"] and item["words"] == ref["words"]
            wav = asr_example(ref)["audio"]
            codes = np.asarray(item["codes"])
            assert codes.dtype == np.int32 and len(codes) == feats.num_frames(len(wav))
            assert abs(len(codes) - len(wav) / 320) <= 1.5
            assert 0 <= codes.min() and codes.max() < 8
            np.testing.assert_array_equal(codes, encoder([wav])[0])


def test_mismatched_hubert_folder_is_refused(units_export, tmp_path):
    export, _ = units_export
    wider = save_hubert(tmp_path / "wide", hidden_size=48)
    with pytest.raises(ValueError, match="hidden size 48.*dim 32"):
        U.UnitEncoder(export, wider, "cpu")
    other = save_hubert(tmp_path / "other-seed", seed=1)
    with pytest.raises(ValueError, match="not the HuBERT model the units"):
        U.UnitEncoder(export, other, "cpu")
    shallow = save_hubert(tmp_path / "shallow", num_hidden_layers=0)
    with pytest.raises(ValueError, match="layer 1 does not exist"):
        U.UnitEncoder(export, shallow, "cpu")


def test_missing_or_wrong_inputs_give_one_clear_error(hubert, units_export, prepared, tmp_path, capsys):
    from lit_keomni.cli import main

    missing = tmp_path / "no-hubert"
    with pytest.raises(FileNotFoundError, match="no-hubert: HuBERT folder not found"):
        U.HubertFeatures(missing, 1)
    with pytest.raises(SystemExit, match="error: .*no-hubert: HuBERT folder not found"):
        main(["units", "fit", "--hubert", str(missing), "--layer", "1", "--k", "4", "--data", str(prepared),
              "--out", str(tmp_path / "u")])
    with pytest.raises(FileNotFoundError, match="chunks/train: no prepared chunks"):
        U.fit_units(hubert, tmp_path / "no-data", tmp_path / "u", layer=1, k=4, device="cpu")
    with pytest.raises(ValueError, match="layer 5 does not exist; choose 0..2"):
        U.HubertFeatures(hubert, 5)
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ValueError, match="field 'model_type' is 'llama', expected 'hubert'"):
        U.HubertFeatures(tmp_path / "llama", 1)
    with pytest.raises(ValueError, match="field 'kind' is 'units', expected 'speech_tokenizer'"):
        from lit_keomni.checkpoints import load_speech_tokenizer
        load_speech_tokenizer(units_export[0])
    with pytest.raises(ValueError, match="fewer than k=100000 units"):
        U.fit_units(hubert, prepared, tmp_path / "u", layer=1, k=100_000, max_frames=10, device="cpu")


def test_fit_on_a_random_subset_of_utterances_with_all_their_frames(hubert, prepared, tmp_path):
    meta = U.fit_units(hubert, prepared, tmp_path / "u", layer=0, k=4, max_utterances=5, max_frames=None,
                       init="random", device="cpu")
    fit = meta["fit"]
    assert fit["utterances"] == 5 and fit["frames_fitted"] == fit["frames_seen"] > 4
    assert meta["config"]["layer"] == 0 and unit_meta(tmp_path / "u")["num_units"] == 4
