"""``python -m lit_keomni units``: discrete speech units from HuBERT features and k-means (KE-Omni, seeds/000 §4.3, §5.1).

KE-Omni's speech decoder predicts "speech representations extracted by HuBERT" clustered "into 4000 clusters" by a
K-means model; its vocoder turns those unit ids back into speech. Two steps:

* ``fit``: features of one HuBERT layer (a local Hugging Face folder, 16 kHz input, one frame per conv hop, 50 Hz for
  HuBERT's 320-sample hop) over the prepared training utterances, a uniform random sample of at most ``max_frames``
  frames, k-means in torch (k-means++ or random init, chunked distances, CUDA when present) -> a ``units`` export:
  ``model.safetensors`` holds ``centroids`` (k, dim); ``config.json`` holds num_units, frame_rate, layer, the HuBERT
  folder's name and fingerprint, feature dim, and the fit's inertia and cluster usage.
* ``apply``: every prepared utterance -> its nearest-centroid ids, written in the ``data/tokens`` layout
  (``OUT/chunks/{train,val}`` items with ``codes`` int32, ``OUT/tokens.json``) through the writer of ``tokenize``, so
  stages 5-7 read HuBERT units with ``tokens_dir`` pointing there. The HuBERT folder must be the one the units were
  fitted on (same weights, feature dim and layer).

Paper settings: k = 4000 (§5.1); the paper names neither the HuBERT checkpoint nor the layer, so both are arguments.
On CUDA, fitting 4000 units on 1 M frames of 768-dim features keeps the frames (3 GiB) and one 128 MiB distance block
on the GPU.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lit_keomni.audio import SAMPLE_RATE
from lit_keomni.checkpoints import CONFIG_FILE, export_fingerprint, load_export, write_export

KIND = "units"
MAX_DISTANCE_ELEMENTS = 1 << 25
"""Largest (frames x centroids) distance block computed at once (128 MiB in float32), whatever k and the data size."""


def import_transformers() -> Any:
    """The ``transformers`` module, or one clear error saying how to install it."""
    try:
        import transformers
    except ImportError:
        raise ValueError("reading Hugging Face HuBERT/Whisper folders needs `transformers`: "
                         "pip install -e '.[hf]'") from None
    return transformers


def hf_folder_config(folder: str | Path, model_type: str, what: str) -> dict[str, Any]:
    """``config.json`` of a local Hugging Face model folder, checked to be a ``model_type`` model."""
    folder = Path(folder)
    cfg = folder / "config.json"
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: {what} folder not found (a local Hugging Face folder; nothing is downloaded)")
    if not cfg.is_file():
        raise FileNotFoundError(f"{cfg}: missing; {folder} is not a Hugging Face {what} folder")
    try:
        config = json.loads(cfg.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{cfg}: not valid JSON ({e})") from None
    if config.get("model_type") != model_type:
        raise ValueError(f"{cfg}: field 'model_type' is {config.get('model_type')!r}, expected {model_type!r} ({what})")
    return config


def folder_fingerprint(folder: str | Path) -> str:
    """SHA-256 of a Hugging Face folder's ``config.json`` and weight files: units are only valid for these weights."""
    folder = Path(folder)
    h = hashlib.sha256()
    files = [folder / "config.json"] + sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin"))
    for path in files:
        h.update(path.name.encode())
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------------ HuBERT features
class HubertFeatures:
    """16 kHz audio -> hidden states of one HuBERT layer, one row per conv hop (``frame_rate`` Hz).

    ``layer`` indexes ``output_hidden_states``: 0 is the input of the first transformer layer, N the output of the N-th.
    Layers above ``layer`` are dropped (one is kept so the last entry never gets a stable-layer-norm model's final norm).
    Models with group norm in the conv stem (HuBERT base) see padding, so they run one clip at a time; layer-norm
    models (HuBERT large) run padded batches with an attention mask. Clips shorter than one receptive field are padded
    with silence to give one frame.
    """

    def __init__(self, folder: str | Path, layer: int, device: str | torch.device = "cpu") -> None:
        config = hf_folder_config(folder, "hubert", "HuBERT")
        transformers = import_transformers()
        self.folder = Path(folder)
        n_layers = int(config.get("num_hidden_layers", 12))
        if not 0 <= layer <= n_layers:
            raise ValueError(f"{self.folder / 'config.json'}: layer {layer} does not exist; choose 0..{n_layers} "
                             f"(field 'num_hidden_layers' is {n_layers})")
        self.layer = layer
        self.device = torch.device(device)
        model = transformers.HubertModel.from_pretrained(str(self.folder), local_files_only=True)
        model.encoder.layers = model.encoder.layers[: min(layer + 1, n_layers)]
        self.model = model.to(self.device).eval()
        self.dim = int(model.config.hidden_size)
        strides = [int(s) for s in model.config.conv_stride]
        self.hop = math.prod(strides)
        self.frame_rate = SAMPLE_RATE / self.hop
        receptive = 1
        for k, s in reversed(list(zip(model.config.conv_kernel, strides))):
            receptive = (receptive - 1) * s + int(k)
        self.min_samples = receptive
        self.batched = model.config.feat_extract_norm == "layer"
        pre = self.folder / "preprocessor_config.json"
        self.normalize = bool(json.loads(pre.read_text()).get("do_normalize", False)) if pre.is_file() else False

    def num_frames(self, num_samples: int) -> int:
        """Frames HuBERT gives for a clip of ``num_samples`` at 16 kHz (at least one)."""
        n = torch.tensor(max(num_samples, self.min_samples))
        return int(self.model._get_feat_extract_output_lengths(n))

    @torch.no_grad()
    def __call__(self, wavs: list[Tensor]) -> list[Tensor]:
        """Features (frames, dim) in float32 on ``device`` for each 16 kHz clip."""
        clips = [self._prepare(w) for w in wavs]
        if not self.batched:
            return [self._run(c[None], None)[0] for c in clips]
        lengths = torch.tensor([len(c) for c in clips])
        audio = torch.zeros(len(clips), int(lengths.max()), device=self.device)
        for i, c in enumerate(clips):
            audio[i, : len(c)] = c
        mask = (torch.arange(audio.shape[1])[None] < lengths[:, None]).long().to(self.device)
        hidden = self._run(audio, mask)
        return [h[: self.num_frames(int(n))] for h, n in zip(hidden, lengths)]

    def _prepare(self, wav: Tensor) -> Tensor:
        wav = wav.float().to(self.device)
        if self.normalize:
            wav = (wav - wav.mean()) / torch.sqrt(wav.var(unbiased=False) + 1e-7)
        if len(wav) < self.min_samples:
            wav = torch.nn.functional.pad(wav, (0, self.min_samples - len(wav)))
        return wav

    def _run(self, audio: Tensor, mask: Tensor | None) -> Tensor:
        out = self.model(audio, attention_mask=mask, output_hidden_states=True)
        return out.hidden_states[self.layer].float()


# ------------------------------------------------------------------------------------------------------------- k-means
@dataclass
class KMeans:
    """A fitted k-means model and its statistics on the fitting data."""

    centroids: Tensor
    """(k, dim)"""
    counts: Tensor
    """(k,) frames assigned to each centroid."""
    inertia: float
    """Mean squared distance of a frame to its centroid."""
    iterations: int
    converged: bool


def assign(x: Tensor, centroids: Tensor) -> tuple[Tensor, Tensor]:
    """Nearest centroid of every row of ``x`` (N, d): (ids (N,) long, squared distances (N,)), on the centroids'
    device; distances are computed in blocks of at most ``MAX_DISTANCE_ELEMENTS``, so memory stays bounded."""
    centroids = centroids.float()
    c_sq = centroids.pow(2).sum(1)
    rows = max(1, MAX_DISTANCE_ELEMENTS // max(1, len(centroids)))
    ids, dists = [], []
    for start in range(0, len(x), rows):
        xb = x[start : start + rows].to(centroids.device, torch.float32)
        d = torch.addmm(c_sq[None], xb, centroids.T, alpha=-2.0)
        best, idx = d.min(1)
        ids.append(idx)
        dists.append((best + xb.pow(2).sum(1)).clamp_min_(0))
    if not ids:
        return torch.zeros(0, dtype=torch.long, device=centroids.device), torch.zeros(0, device=centroids.device)
    return torch.cat(ids), torch.cat(dists)


def _kmeans_pp(x: Tensor, k: int, g: torch.Generator) -> Tensor:
    """k-means++ seeding: each new centroid is a data point drawn with probability proportional to its squared
    distance to the nearest centroid chosen so far."""
    centroids = torch.empty(k, x.shape[1], device=x.device)
    x_sq = x.pow(2).sum(1)

    def sq_dist(c: Tensor) -> Tensor:  # |x|^2 - 2 x.c + |c|^2: no (frames, dim) temporary
        return (x_sq - 2 * (x @ c) + c.dot(c)).clamp_min_(0)

    centroids[0] = x[int(torch.randint(len(x), (1,), generator=g))]
    d2 = sq_dist(centroids[0])
    for i in range(1, k):
        cum = d2.double().cumsum(0)
        total = float(cum[-1])
        if total <= 0:  # every point already sits on a centroid: any point will do
            j = int(torch.randint(len(x), (1,), generator=g))
        else:
            r = torch.rand(1, generator=g, dtype=torch.float64).item() * total
            j = min(int(torch.searchsorted(cum, torch.tensor([r], dtype=torch.float64, device=x.device))), len(x) - 1)
        centroids[i] = x[j]
        d2 = torch.minimum(d2, sq_dist(centroids[i]))
    return centroids


def kmeans(x: Tensor, k: int, *, init: str = "k-means++", max_iter: int = 100, tol: float = 1e-4, seed: int = 0) -> KMeans:
    """Lloyd's k-means of ``x`` (N, d) on ``x``'s device; deterministic for a seed.

    Args:
        init: ``"k-means++"`` or ``"random"`` (k distinct data points).
        max_iter: most Lloyd iterations.
        tol: stop when the centroids move less than ``tol`` times the mean feature variance (squared shift, summed),
            as scikit-learn does.
    An emptied cluster is moved to the frame farthest from its centroid.
    """
    if x.dim() != 2:
        raise ValueError(f"kmeans: data must be (frames, dim), got shape {tuple(x.shape)}")
    if k < 1 or len(x) < k:
        raise ValueError(f"kmeans: {len(x)} frames cannot make k={k} clusters (need at least k frames)")
    if init not in ("k-means++", "random"):
        raise ValueError(f"kmeans: init {init!r} is not 'k-means++' or 'random'")
    x = x.float()
    g = torch.Generator().manual_seed(seed)
    if init == "random":
        centroids = x[torch.randperm(len(x), generator=g)[:k].to(x.device)].clone()
    else:
        centroids = _kmeans_pp(x, k, g)
    threshold = tol * float(x.var(0, unbiased=False).mean())
    converged, it = False, 0
    for it in range(1, max_iter + 1):
        ids, d2 = assign(x, centroids)
        counts = torch.bincount(ids, minlength=k)
        sums = torch.zeros_like(centroids).index_add_(0, ids, x)
        new = sums / counts.clamp_min(1)[:, None].float()
        empty = (counts == 0).nonzero().flatten()
        if len(empty):
            new[empty] = x[d2.topk(len(empty)).indices]
        shift = float((new - centroids).pow(2).sum())
        centroids = new
        if shift <= threshold:
            converged = True
            break
    ids, d2 = assign(x, centroids)
    return KMeans(centroids=centroids, counts=torch.bincount(ids, minlength=k), inertia=float(d2.mean()),
                  iterations=it, converged=converged)


def usage(counts: Tensor) -> dict[str, float | int]:
    """Cluster usage: clusters with at least one frame, and the perplexity of the frame distribution over clusters."""
    p = counts.double() / counts.sum().clamp_min(1)
    entropy = float(-(p[p > 0] * p[p > 0].log()).sum())
    return {"used": int((counts > 0).sum()), "num_units": len(counts), "perplexity": round(math.exp(entropy), 2)}


class FrameSample:
    """A uniform random sample of at most ``max_frames`` rows from a stream of feature blocks (all rows when None),
    in bounded memory: every row gets a random key and the ``max_frames`` smallest keys are kept."""

    def __init__(self, max_frames: int | None, seed: int = 0) -> None:
        self.max_frames = max_frames
        self.g = torch.Generator().manual_seed(seed)
        self.rows: list[Tensor] = []
        self.keys: list[Tensor] = []
        self.buffered = 0
        self.seen = 0

    def add(self, feats: Tensor) -> None:
        feats = feats.detach().float().cpu()
        self.rows.append(feats)
        self.keys.append(torch.rand(len(feats), generator=self.g))
        self.buffered += len(feats)
        self.seen += len(feats)
        if self.max_frames is not None and self.buffered > 2 * self.max_frames:
            self._shrink()

    def _shrink(self) -> None:
        rows, keys = torch.cat(self.rows), torch.cat(self.keys)
        keep = keys.topk(min(self.max_frames or len(keys), len(keys)), largest=False).indices.sort().values
        self.rows, self.keys, self.buffered = [rows[keep]], [keys[keep]], len(keep)

    def frames(self) -> Tensor:
        if not self.rows:
            return torch.zeros(0, 0)
        self._shrink()
        return self.rows[0]


# ------------------------------------------------------------------------------------------------------------- fit/apply
def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _prepared_items(data: str | Path, split: str) -> Any:
    from litdata import StreamingDataset

    from datamodules.streaming import chunks_dir

    src = chunks_dir(data, split)
    if not (src / "index.json").is_file():
        raise FileNotFoundError(f"{src}: no prepared chunks (run `python -m lit_keomni prepare --out {data}`)")
    return StreamingDataset(str(src))


def fit_units(hubert: str | Path, data: str | Path, out: str | Path, *, layer: int, k: int = 4000,
              max_frames: int | None = 1_000_000, max_utterances: int | None = None, init: str = "k-means++",
              max_iter: int = 100, tol: float = 1e-4, seed: int = 0, batch_size: int = 16,
              device: str | None = None) -> dict[str, Any]:
    """Fit k-means on HuBERT layer ``layer`` features of the prepared training utterances of ``data`` (a random
    ``max_utterances`` of them when given; a uniform sample of at most ``max_frames`` of their frames); write the
    ``units`` export to ``out`` and return its metadata (with the fit's inertia and cluster usage)."""
    from datamodules.tokenizer import asr_example

    device = device or default_device()
    features = HubertFeatures(hubert, layer, device)
    dataset = _prepared_items(data, "train")
    sample = FrameSample(max_frames, seed)
    indices = list(range(len(dataset)))
    if max_utterances is not None and max_utterances < len(indices):
        pick = torch.randperm(len(indices), generator=torch.Generator().manual_seed(seed))[:max_utterances]
        indices = sorted(pick.tolist())
    n = len(indices)
    for start in range(0, n, batch_size):
        wavs = [asr_example(dataset[i])["audio"] for i in indices[start : start + batch_size]]
        for f in features(wavs):
            sample.add(f)
    x = sample.frames().to(device)
    if len(x) < k:
        raise ValueError(f"{data}: the training split gives {len(x)} HuBERT frames, fewer than k={k} units")
    km = kmeans(x, k, init=init, max_iter=max_iter, tol=tol, seed=seed)
    config = {"num_units": k, "frame_rate": features.frame_rate, "layer": layer, "hubert": features.folder.resolve().name,
              "feature_dim": features.dim, "hop": features.hop, "sample_rate": SAMPLE_RATE, "normalize": features.normalize}
    fit = {"utterances": n, "frames_seen": sample.seen, "frames_fitted": len(x), "init": init, "seed": seed,
           "iterations": km.iterations, "converged": km.converged, "inertia": round(km.inertia, 6),
           **usage(km.counts.cpu())}
    extra = {"sample_rate": SAMPLE_RATE, "hubert_path": str(features.folder.resolve()),
             "hubert_fingerprint": folder_fingerprint(features.folder), "data": str(data), "fit": fit}
    write_export(out, kind=KIND, config=config, state_dict={"centroids": km.centroids}, extra=extra)
    return {"kind": KIND, "config": config, **extra}


def load_units(path: str | Path) -> tuple[Tensor, dict[str, Any]]:
    """A ``units`` export -> (centroids (num_units, feature_dim), export metadata), sizes checked."""
    exp = load_export(path, KIND)
    cfg = exp.path / CONFIG_FILE
    for field in ("num_units", "frame_rate", "layer", "feature_dim"):
        if field not in exp.config:
            raise ValueError(f"{cfg}: field 'config.{field}' missing")
    centroids = exp.state_dict.get("centroids")
    want = (exp.config["num_units"], exp.config["feature_dim"])
    if centroids is None or tuple(centroids.shape) != want:
        found = None if centroids is None else tuple(centroids.shape)
        raise ValueError(f"{exp.path / 'model.safetensors'}: 'centroids' has shape {found}, but {cfg} says {want}")
    return centroids.float(), exp.meta


def check_hubert(meta: dict[str, Any], features: HubertFeatures, units: str | Path, *, weights: bool = True) -> None:
    """One clear error unless ``features`` is the HuBERT model and layer the units export was fitted on."""
    cfg, where = meta["config"], f"{Path(units) / CONFIG_FILE}"
    if features.dim != cfg["feature_dim"]:
        raise ValueError(f"{features.folder}: HuBERT hidden size {features.dim}, but the units in {units} were fitted on "
                         f"features of dim {cfg['feature_dim']} ({where} field 'config.feature_dim', HuBERT folder "
                         f"{meta.get('hubert_path', cfg.get('hubert'))!r})")
    if features.layer != cfg["layer"]:
        raise ValueError(f"layer {features.layer} requested, but {where} field 'config.layer' is {cfg['layer']}")
    if abs(features.frame_rate - float(cfg["frame_rate"])) > 1e-6:
        raise ValueError(f"{features.folder}: HuBERT gives {features.frame_rate} frames/s, but {where} field "
                         f"'config.frame_rate' is {cfg['frame_rate']}")
    if weights and meta.get("hubert_fingerprint") not in (None, folder_fingerprint(features.folder)):
        raise ValueError(f"{features.folder}: not the HuBERT model the units in {units} were fitted on (its config/weights "
                         f"differ from {meta.get('hubert_path', cfg.get('hubert'))!r}, {where} field 'hubert_fingerprint')")


class UnitEncoder:
    """Audio (16 kHz) -> HuBERT k-means unit ids with a ``units`` export and the HuBERT folder it was fitted on."""

    def __init__(self, units: str | Path, hubert: str | Path | None = None, device: str | None = None,
                 check_weights: bool = True) -> None:
        self.centroids, self.meta = load_units(units)
        hubert = hubert if hubert is not None else self.meta.get("hubert_path")
        if hubert is None:
            raise ValueError(f"{Path(units) / CONFIG_FILE}: no field 'hubert_path'; name the HuBERT folder (--hubert)")
        self.features = HubertFeatures(hubert, int(self.meta["config"]["layer"]), device or default_device())
        check_hubert(self.meta, self.features, units, weights=check_weights)
        self.centroids = self.centroids.to(self.features.device)

    def __call__(self, wavs: list[Tensor]) -> list[np.ndarray]:
        return [assign(f, self.centroids)[0].to(torch.int32).cpu().numpy() for f in self.features(wavs)]


def apply_units(units: str | Path, data: str | Path, out: str | Path, *, hubert: str | Path | None = None,
                batch_size: int = 16, workers: int = 1, device: str | None = None) -> dict[str, Any]:
    """Unit ids of every prepared utterance of ``data`` into ``out`` (the ``data/tokens`` layout); returns the
    ``tokens.json`` stamp, whose ``fingerprint`` is the units export's (``tokens_are_current(out, units)``)."""
    from lit_keomni.speech_tokens import encode_splits

    device = device or default_device()
    encoder = UnitEncoder(units, hubert, device)  # fails here, in this process, on a bad export or HuBERT folder
    cfg = encoder.meta["config"]
    stamp = {"export": str(Path(units).resolve()), "fingerprint": export_fingerprint(units), "kind": KIND,
             "frame_rate_hz": cfg["frame_rate"], "codebook_size": cfg["num_units"],
             "hubert": str(encoder.features.folder.resolve()), "layer": cfg["layer"], "data": str(data)}
    del encoder
    make = partial(UnitEncoder, str(Path(units).resolve()), stamp["hubert"], device, False)
    return encode_splits(make, data, out, stamp, batch_size=batch_size, workers=workers)
