"""Single-codebook vector quantizer with an EMA codebook (GLM-4-Voice §2.1, Appendix B.1).

GLM-4-Voice inserts a VQ layer in the middle of a Whisper encoder and fine-tunes it on ASR; the codes are its 12.5 Hz
speech tokens. Notable features, all from the paper and from Jukebox (Dhariwal et al. 2020), which it cites:

- the codebook is a buffer updated by an exponential moving average of the vectors assigned to each code (decay 0.99),
  not by gradients, so optimisers never see it;
- the encoder is pulled towards its codes by a commitment loss (coefficient 10.0 in the paper) and gets gradients
  through the quantizer by the straight-through estimator;
- codes whose EMA usage falls below a threshold ("dead" codes) are restarted from random current inputs;
- under torch.distributed, per-step statistics are all-reduced and restart vectors are chosen on rank 0, so every
  replica keeps an identical codebook without relying on DDP's buffer broadcast (which FSDP does not do).

``kmeans`` is the plain Lloyd algorithm used to initialise the codebook from pre-VQ features (and, later, for HuBERT
units).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

# Rows of x per distance block: bounds the (rows, K) distance matrix to ~0.5 GiB for K = 16384 in float32.
_CHUNK = 8192


class VQOutput(NamedTuple):
    """What ``VectorQuantizer.forward`` returns."""

    quantized: Tensor
    """(B, T, D) codebook vectors, with the straight-through gradient to the input."""
    codes: Tensor
    """(B, T) long code indices (padding frames get a code too; ignore them with the mask)."""
    commitment_loss: Tensor
    """Scalar: commitment * mean squared error between input and (detached) codes, over valid frames."""
    perplexity: Tensor
    """Scalar: exp(entropy) of code usage over this rank's valid frames; K means perfectly uniform usage."""
    usage: Tensor
    """Scalar: fraction of the codebook used at least once in this rank's batch."""
    restarted: int
    """Number of dead codes restarted in this step (0 outside training)."""


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _draw_rows(x: Tensor, n: int, generator: torch.Generator | None = None) -> Tensor:
    """``n`` rows of ``x`` (N, D) drawn with replacement, plus a little noise so that duplicated rows become distinct
    codes (float32)."""
    x = x.float()
    rows = x[torch.randint(x.shape[0], (n,), device=x.device, generator=generator)]
    return rows + 0.01 * x.std() * torch.randn(rows.shape, device=x.device, generator=generator)


@torch.no_grad()
def nearest(x: Tensor, codebook: Tensor) -> tuple[Tensor, Tensor]:
    """Index of, and squared euclidean distance to, the nearest codebook row for each row of ``x``.

    Args:
        x: (N, D) vectors.
        codebook: (K, D) centroids.

    Returns:
        (codes (N,) long, squared distances (N,) float32).
    """
    codes, dists = [], []
    # float32 without autocast: bf16 distances tie often enough to make argmin (and thus the EMA) noisy.
    with torch.autocast(device_type=x.device.type, enabled=False):
        c = codebook.float()
        c_sq = c.pow(2).sum(-1)
        for xb in x.float().split(_CHUNK):
            # ||x||^2 - 2 x.c + ||c||^2, with ||x||^2 added after the argmin since it does not change it.
            d = torch.addmm(c_sq, xb, c.t(), alpha=-2.0)
            best, idx = d.min(dim=-1)
            codes.append(idx)
            dists.append((best + xb.pow(2).sum(-1)).clamp_min(0.0))
    return torch.cat(codes), torch.cat(dists)


@torch.no_grad()
def _kmeans_plus_plus(x: Tensor, k: int, seed: int) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    uniforms = torch.rand(k, generator=gen, dtype=torch.float64).to(x.device)
    centroids = torch.empty(k, x.shape[1], device=x.device, dtype=x.dtype)
    centroids[0] = x[int(uniforms[0].item() * x.shape[0])]
    closest = (x - centroids[0]).pow(2).sum(-1)
    for i in range(1, k):
        # Inverse-CDF draw on the device: one uniform per step, no (N,) transfer to the host.
        cdf = closest.double().cumsum(0)
        idx = torch.searchsorted(cdf, uniforms[i : i + 1] * cdf[-1]).clamp_max(x.shape[0] - 1)
        centroids[i] = x[idx[0]]
        closest = torch.minimum(closest, (x - centroids[i]).pow(2).sum(-1))
    return centroids


@torch.no_grad()
def kmeans(x: Tensor, k: int, iters: int = 20, seed: int = 0) -> Tensor:
    """Lloyd's k-means on the rows of ``x``, in torch (runs on whatever device ``x`` is on).

    Centroids start by k-means++ (Arthur & Vassilvitskii 2007): each next one is a row drawn with probability
    proportional to its squared distance from the centroids so far. With random rows instead, clusters that draw two
    seeds keep them and others get none, a local minimum Lloyd never leaves. Its cost is about one Lloyd iteration
    (k passes of N x D), in k small sequential steps. A cluster that empties is re-seeded with the point currently
    worst served by its centroid, so all ``k`` centroids stay in use.

    Args:
        x: (N, D) samples, N >= k.
        k: number of centroids.
        iters: Lloyd iterations.
        seed: seed of the k-means++ draws (a CPU generator, so the result does not depend on the device's RNG).

    Returns:
        (k, D) float32 centroids.
    """
    if x.dim() != 2:
        raise ValueError(f"kmeans: x must be (N, D), got shape {tuple(x.shape)}")
    n = x.shape[0]
    if n < k:
        raise ValueError(f"kmeans: need at least k={k} samples, got N={n}")
    x = x.float()
    centroids = _kmeans_plus_plus(x, k, seed)
    for _ in range(iters):
        codes, dists = nearest(x, centroids)
        counts = torch.bincount(codes, minlength=k)
        sums = torch.zeros_like(centroids).index_add_(0, codes, x)
        filled = counts > 0
        centroids[filled] = sums[filled] / counts[filled].unsqueeze(1).float()
        n_empty = int((~filled).sum())
        if n_empty:
            far = dists.topk(n_empty).indices
            centroids[~filled] = x[far]
    return centroids


class VectorQuantizer(nn.Module):
    """EMA vector quantizer: (B, T, D) features → nearest of ``codebook_size`` codes, with straight-through gradients.

    Args:
        dim: feature dimension D.
        codebook_size: number of codes K (16384 in GLM-4-Voice).
        decay: EMA decay of the code statistics (0.99 in the paper).
        commitment: weight of the commitment loss (10.0 in the paper).
        restart_threshold: a code whose EMA assignment count per step falls below this is restarted from a random
            current input (Jukebox uses 1.0); 0 disables restarts. Keep it well below the mean assignments per code,
            (valid frames per step over all ranks) / K: otherwise healthy codes are restarted every step.
        eps: Laplace smoothing of cluster sizes, so a code with no assignments does not divide by zero.
        cosine: l2-normalise inputs and codes (nearest by cosine similarity); the output is then the normalised code.
    """

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        *,
        decay: float = 0.99,
        commitment: float = 10.0,
        restart_threshold: float = 1.0,
        eps: float = 1e-5,
        cosine: bool = False,
    ) -> None:
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"VectorQuantizer: decay must be in [0, 1), got {decay}")
        self.dim = dim
        self.codebook_size = codebook_size
        self.decay = decay
        self.commitment = commitment
        self.restart_threshold = restart_threshold
        self.eps = eps
        self.cosine = cosine
        # Buffers, not parameters: the codebook moves by EMA only, and buffers are saved in checkpoints.
        self.register_buffer("codebook", torch.empty(codebook_size, dim))
        self.register_buffer("cluster_size", torch.empty(codebook_size))
        self.register_buffer("embed_sum", torch.empty(codebook_size, dim))
        self.register_buffer("initialized", torch.empty((), dtype=torch.bool))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Random, uninitialised codebook (the first training batch or ``init_from_kmeans`` replaces it).

        Named so that Lightning/FSDP meta-device materialisation (``to_empty`` then ``reset_parameters``) calls it.
        """
        self.codebook.normal_()
        self.cluster_size.fill_(1.0)
        self.embed_sum.copy_(self.codebook)
        self.initialized.fill_(False)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, codebook_size={self.codebook_size}, decay={self.decay}, "
            f"commitment={self.commitment}, restart_threshold={self.restart_threshold}, cosine={self.cosine}"
        )

    # ------------------------------------------------------------------ initialisation

    @torch.no_grad()
    def init_codebook(self, vectors: Tensor) -> None:
        """Set the codebook to ``vectors`` (K, D) and reset the EMA statistics to one assignment per code.

        The unit mass (as Jukebox) lets the first batches move codes quickly while keeping embed_sum / cluster_size
        equal to the codebook. Under torch.distributed rank 0's vectors are broadcast, so replicas agree.
        """
        if vectors.shape != self.codebook.shape:
            raise ValueError(f"init_codebook: expected shape {tuple(self.codebook.shape)}, got {tuple(vectors.shape)}")
        vectors = vectors.to(self.codebook)
        if self.cosine:
            vectors = F.normalize(vectors, dim=-1)
        if _distributed():
            vectors = vectors.contiguous()
            dist.broadcast(vectors, src=0)
        self.codebook.copy_(vectors)
        self.cluster_size.fill_(1.0)
        self.embed_sum.copy_(vectors)
        self.initialized.fill_(True)

    @torch.no_grad()
    def init_from_kmeans(self, x: Tensor, iters: int = 20, seed: int = 0) -> None:
        """Initialise the codebook by k-means on a (N, D) sample of pre-VQ features.

        This is how to insert a VQ into an already trained encoder without collapsing it: the codes start where the
        features are. With fewer rows than codes (a short run), the codes are the rows drawn with replacement plus a
        little noise, and dead-code restarts spread them later. Under torch.distributed, rank 0's centroids are used
        everywhere.
        """
        x = x.reshape(-1, self.dim).to(self.codebook.device).float()
        if self.cosine:
            x = F.normalize(x, dim=-1)
        if x.shape[0] == 0:
            raise ValueError("init_from_kmeans: no features to initialise the codebook from")
        if x.shape[0] >= self.codebook_size:
            self.init_codebook(kmeans(x, self.codebook_size, iters=iters, seed=seed))
            return
        self.init_codebook(_draw_rows(x, self.codebook_size, torch.Generator(device=x.device).manual_seed(seed)))

    @torch.no_grad()
    def _sample_inputs(self, x: Tensor, n: int) -> Tensor | None:
        """``n`` random rows of ``x`` (N, D), identical on every rank (rank 0's choice); None if rank 0 has no rows.

        Sampling is with replacement when N < n, plus a little noise so that duplicated rows become distinct codes.
        """
        flag = torch.tensor([float(x.shape[0] > 0)], device=x.device)
        out = torch.zeros(n, self.dim, device=x.device, dtype=torch.float32)
        if x.shape[0] > 0:
            if x.shape[0] >= n:
                out = x[torch.randperm(x.shape[0], device=x.device)[:n]].float()
            else:
                out = _draw_rows(x, n)
        if _distributed():
            dist.broadcast(flag, src=0)
            dist.broadcast(out, src=0)
        if flag.item() == 0:
            return None
        return out

    # ------------------------------------------------------------------ encode / decode

    def _prepare(self, x: Tensor) -> Tensor:
        return F.normalize(x, dim=-1) if self.cosine else x

    def encode(self, x: Tensor) -> Tensor:
        """Codes (...,) long of features (..., D); no statistics are touched."""
        codes, _ = nearest(self._prepare(x).reshape(-1, self.dim), self.codebook)
        return codes.reshape(x.shape[:-1])

    def decode(self, codes: Tensor) -> Tensor:
        """Codebook vectors (..., D) of codes (...,)."""
        return F.embedding(codes, self.codebook)

    # ------------------------------------------------------------------ forward

    def forward(self, x: Tensor, mask: Tensor | None = None) -> VQOutput:
        """Quantize ``x`` (B, T, D); ``mask`` (B, T) is True on valid frames (padding is never counted or learned)."""
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"VectorQuantizer: x must be (B, T, {self.dim}), got shape {tuple(x.shape)}")
        b, t, d = x.shape
        x = self._prepare(x)
        flat = x.reshape(-1, d)
        valid = torch.ones(b * t, dtype=torch.bool, device=x.device) if mask is None else mask.reshape(-1).bool()
        if valid.shape[0] != b * t:
            raise ValueError(f"VectorQuantizer: mask must be (B, T) = {(b, t)}, got shape {tuple(mask.shape)}")

        if self.training and not bool(self.initialized):
            # Lazy init: codes start at random frames of the first batch, so none start far from the data.
            sample = self._sample_inputs(flat.detach()[valid], self.codebook_size)
            if sample is not None:
                self.init_codebook(sample)

        codes, _ = nearest(flat.detach(), self.codebook)
        q32 = F.embedding(codes, self.codebook)
        q = q32.to(x.dtype)

        # Commitment: pull the encoder towards its (fixed) codes, on valid frames only; float32 under autocast.
        n_valid = valid.sum()
        sq_err = (flat.float() - q32).pow(2).sum(-1)
        commitment_loss = self.commitment * sq_err.masked_fill(~valid, 0.0).sum() / (n_valid.clamp_min(1) * d)

        codes_valid = codes[valid]
        counts = torch.bincount(codes_valid, minlength=self.codebook_size).float()
        probs = counts / counts.sum().clamp_min(1.0)
        perplexity = torch.exp(-(probs * torch.log(probs.clamp_min(1e-10))).sum())
        usage = (counts > 0).float().mean()

        restarted = 0
        if self.training:
            restarted = self._ema_update(flat.detach()[valid], codes_valid, counts)

        quantized = flat + (q - flat).detach()  # straight-through: d quantized / d x = identity
        return VQOutput(quantized.reshape(b, t, d), codes.reshape(b, t), commitment_loss, perplexity, usage, restarted)

    @torch.no_grad()
    def _ema_update(self, x: Tensor, codes: Tensor, counts: Tensor) -> int:
        """One EMA step on valid frames ``x`` (N, D) with their ``codes`` and per-code ``counts``; returns #restarts."""
        counts = counts.clone()
        sums = torch.zeros_like(self.embed_sum).index_add_(0, codes, x.float())
        if _distributed():
            # Global statistics: every rank applies the same update, so codebooks stay identical.
            dist.all_reduce(counts)
            dist.all_reduce(sums)
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1.0 - self.decay)
        self.embed_sum.mul_(self.decay).add_(sums, alpha=1.0 - self.decay)
        # Laplace smoothing keeps an unused code's denominator positive without changing the total mass.
        total = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (total + self.codebook_size * self.eps) * total
        codebook = self.embed_sum / smoothed.unsqueeze(1)
        if self.cosine:
            codebook = F.normalize(codebook, dim=-1)
        self.codebook.copy_(codebook)

        if self.restart_threshold <= 0:
            return 0
        dead = self.cluster_size < self.restart_threshold
        n_dead = int(dead.sum())
        if n_dead == 0:
            return 0
        fresh = self._sample_inputs(x, n_dead)
        if fresh is None:
            return 0
        if self.cosine:
            fresh = F.normalize(fresh, dim=-1)
        # A restarted code gets exactly the threshold's mass: it must win inputs soon or it is restarted again.
        self.codebook[dead] = fresh
        self.cluster_size[dead] = self.restart_threshold
        self.embed_sum[dead] = fresh * self.restart_threshold
        return n_dead
