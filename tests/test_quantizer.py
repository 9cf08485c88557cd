"""VectorQuantizer: EMA learning, dead-code restarts, straight-through gradients, masking, k-means init, DDP sync."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lit_keomni.nn.quantizer import VectorQuantizer, kmeans, nearest

D = 8


def _clusters(n_per: int, centers: torch.Tensor, spread: float = 0.05, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(n_per * len(centers), centers.shape[1], generator=g)
    return centers.repeat_interleave(n_per, 0) + spread * noise


def _vq(k: int, vectors: torch.Tensor | None = None, **kw) -> VectorQuantizer:
    vq = VectorQuantizer(D, k, **kw)
    if vectors is not None:
        vq.init_codebook(vectors)
    return vq


def test_ema_moves_codes_towards_their_vectors() -> None:
    torch.manual_seed(0)
    centers = 3 * torch.randn(4, D)
    x = _clusters(64, centers)[None]  # (1, 256, D)
    vq = _vq(4, centers + 0.5 * torch.randn(4, D), decay=0.9, restart_threshold=0.0).train()
    before = (vq.codebook - centers).norm(dim=-1)
    losses = [vq(x).commitment_loss.item() for _ in range(30)]
    after = (vq.codebook - centers).norm(dim=-1)
    assert (after < before).all()
    assert after.max() < 0.1
    assert losses[-1] < 0.1 * losses[0]


def test_dead_codes_restart_to_input_vectors() -> None:
    torch.manual_seed(0)
    centers = torch.randn(4, D)
    x = _clusters(32, centers)[None]
    far = 100.0 + torch.randn(4, D)  # codes 4..7 start far from everything: never assigned
    vq = _vq(8, torch.cat([centers, far]), restart_threshold=1.0).train()
    out = vq(x)
    assert out.restarted == 4
    # Restarted codes sit on actual input vectors now.
    _, d = nearest(vq.codebook[4:], x[0])
    assert d.max() < 1e-5
    assert (vq.cluster_size[4:] == 1.0).all()
    assert vq.training and out.codes.max() < 4  # restart happens after the assignment of this step


def test_straight_through_gradient() -> None:
    torch.manual_seed(0)
    vq = _vq(16, torch.randn(16, D)).train()
    x = torch.randn(2, 5, D, requires_grad=True)
    upstream = torch.randn(2, 5, D)
    codebook = vq.codebook.clone()  # the EMA step below moves it
    out = vq(x)
    (out.quantized * upstream).sum().backward()
    torch.testing.assert_close(x.grad, upstream)
    # The forward value is the code itself (up to the float rounding of x + (q - x)).
    torch.testing.assert_close(out.quantized.detach(), codebook[out.codes])
    # The commitment loss reaches the input only.
    x2 = x.detach().clone().requires_grad_(True)
    vq.eval()
    o2 = vq(x2)
    o2.commitment_loss.backward()
    expected = 10.0 * 2 * (x2.detach() - vq.decode(o2.codes)) / x2.numel()
    torch.testing.assert_close(x2.grad, expected)


def test_masked_frames_never_touch_the_codebook() -> None:
    torch.manual_seed(0)
    codes = torch.randn(8, D)
    x = torch.randn(2, 6, D)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 3:] = False
    vq_a = _vq(8, codes, restart_threshold=0.0).train()
    vq_b = _vq(8, codes, restart_threshold=0.0).train()
    x_b = x.clone()
    x_b[1, 3:] = 1000.0 * torch.randn(3, D)  # whatever sits in the padding
    out_a, out_b = vq_a(x, mask), vq_b(x_b, mask)
    for name in ("codebook", "cluster_size", "embed_sum"):
        torch.testing.assert_close(getattr(vq_a, name), getattr(vq_b, name))
    torch.testing.assert_close(out_a.commitment_loss, out_b.commitment_loss)
    torch.testing.assert_close(out_a.perplexity, out_b.perplexity)
    assert vq_a.cluster_size.sum().item() == pytest.approx(8 * 0.99 + 9 * 0.01)  # 9 valid frames counted


def test_eval_leaves_buffers_unchanged() -> None:
    vq = _vq(8, torch.randn(8, D)).eval()
    state = {k: v.clone() for k, v in vq.state_dict().items()}
    out = vq(torch.randn(3, 7, D))
    assert out.restarted == 0
    for k, v in vq.state_dict().items():
        assert torch.equal(v, state[k]), k
    # An uninitialised quantizer in eval mode stays uninitialised (no lazy init outside training).
    fresh = VectorQuantizer(D, 8).eval()
    fresh(torch.randn(1, 3, D))
    assert not fresh.initialized


def test_lazy_init_from_first_batch() -> None:
    torch.manual_seed(0)
    vq = VectorQuantizer(D, 16, restart_threshold=0.0).train()
    x = torch.randn(2, 20, D)
    mask = torch.ones(2, 20, dtype=torch.bool)
    mask[:, 10:] = False
    vq(x, mask)
    assert vq.initialized
    # Before the EMA step each code was a valid frame; after one step codes stay close to valid frames.
    _, d = nearest(vq.codebook, x[:, :10].reshape(-1, D))
    assert d.max() < 1.0


def test_kmeans_init_beats_random_init() -> None:
    torch.manual_seed(0)
    centers = 4 * torch.randn(16, D)
    x = _clusters(50, centers, spread=0.1)
    random_vq = _vq(16, x[torch.randperm(len(x))[:16]])
    km_vq = VectorQuantizer(D, 16)
    km_vq.init_from_kmeans(x, iters=20, seed=0)
    assert km_vq.initialized
    torch.testing.assert_close(km_vq.embed_sum / km_vq.cluster_size[:, None], km_vq.codebook)

    def err(vq: VectorQuantizer) -> float:
        return nearest(x, vq.codebook)[1].mean().item()

    assert err(km_vq) < 0.5 * err(random_vq)
    assert err(km_vq) < 2 * D * 0.1**2  # close to the within-cluster variance
    assert torch.equal(kmeans(x, 16, seed=3), kmeans(x, 16, seed=3))
    with pytest.raises(ValueError, match="at least k=16"):
        kmeans(x[:10], 16)


def test_kmeans_init_with_fewer_features_than_codes() -> None:
    """A short run switches the VQ on with fewer pooled frames than codes: every code starts at one of the frames
    (plus a little noise, so no two codes are equal) instead of the run failing; no frames is one clear error."""
    torch.manual_seed(0)
    x = torch.randn(5, D)
    vq = VectorQuantizer(D, 16)
    vq.init_from_kmeans(x, seed=1)
    assert vq.initialized and torch.isfinite(vq.codebook).all()
    assert len({tuple(c.tolist()) for c in vq.codebook}) == 16
    assert nearest(vq.codebook, x)[1].max() < 1e-3 * D  # squared distance of each code to its frame
    assert len(set(nearest(vq.codebook, x)[0].tolist())) > 1
    with pytest.raises(ValueError, match="no features"):
        VectorQuantizer(D, 16).init_from_kmeans(torch.zeros(0, D))


def test_cosine_variant_keeps_unit_codes() -> None:
    torch.manual_seed(0)
    vq = VectorQuantizer(D, 8, cosine=True).train()
    for _ in range(3):
        out = vq(torch.randn(2, 16, D))
    torch.testing.assert_close(vq.codebook.norm(dim=-1), torch.ones(8))
    torch.testing.assert_close(out.quantized.norm(dim=-1), torch.ones(2, 16))


def test_state_dict_round_trip() -> None:
    torch.manual_seed(0)
    vq = VectorQuantizer(D, 8).train()
    for _ in range(3):
        vq(torch.randn(2, 10, D))
    sd = vq.state_dict()
    assert set(sd) == {"codebook", "cluster_size", "embed_sum", "initialized"}
    assert not list(vq.parameters())  # nothing for an optimiser
    other = VectorQuantizer(D, 8)
    other.load_state_dict(sd)
    for k in sd:
        assert torch.equal(other.state_dict()[k], sd[k]), k
    x = torch.randn(2, 4, D)
    assert torch.equal(other.encode(x), vq.encode(x))


# ---------------------------------------------------------------- distributed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _data(steps: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(4, 12, D, generator=g) for _ in range(steps)]


def _worker(rank: int, world: int, port: int, codes: torch.Tensor, out_dir: str, threshold: float) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(100 + rank)  # different RNG per rank: restarts must still agree
        vq = _vq(codes.shape[0], codes, restart_threshold=threshold, decay=0.8).train()
        restarted = 0
        for x in _data(5):
            restarted += vq(x[2 * rank : 2 * rank + 2]).restarted  # each rank sees half of the batch
        state = {"codebook": vq.codebook, "cluster_size": vq.cluster_size, "restarted": restarted}
        torch.save(state, os.path.join(out_dir, f"{threshold}_{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("threshold", [0.0, 1.0])
def test_distributed_replicas_agree_with_single_process(tmp_path, threshold: float) -> None:
    codes = torch.randn(32, D)
    mp.spawn(_worker, args=(2, _free_port(), codes, str(tmp_path), threshold), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"{threshold}_{r}.pt") for r in (0, 1))
    assert torch.equal(r0["codebook"], r1["codebook"])
    assert torch.equal(r0["cluster_size"], r1["cluster_size"])
    if threshold == 0.0:
        single = _vq(32, codes, restart_threshold=0.0, decay=0.8).train()
        for x in _data(5):
            single(x)
        torch.testing.assert_close(r0["codebook"], single.codebook, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(r0["cluster_size"], single.cluster_size)
    else:
        assert r0["restarted"] > 0  # the restart path really ran on both ranks
