"""generate.py: sampling rules and batched KV-cache generation against full recomputation."""

import pytest
import torch

from lit_keomni.configs import TransformerConfig
from lit_keomni.generate import generate, sample
from lit_keomni.nn.transformer import Transformer


@pytest.fixture(scope="module")
def model() -> Transformer:
    torch.manual_seed(0)
    m = Transformer(TransformerConfig.from_name("tiny", vocab_size=500)).eval()
    with torch.no_grad():  # sharper logits than a 0.02-std init, so greedy choices are far from ties
        m.lm_head.weight.mul_(50)
    return m


def greedy_by_recompute(model: Transformer, prompt: list[int], n: int, stop: set[int] = frozenset()) -> list[int]:
    seq = list(prompt)
    out = []
    with torch.no_grad():
        for _ in range(n):
            tok = int(model(torch.tensor([seq]))[0, -1, : model.config.vocab_size].argmax())
            if tok in stop:
                break
            out.append(tok)
            seq.append(tok)
    return out


def test_sample_rules():
    logits = torch.randn(4, 50)
    assert torch.equal(sample(logits, temperature=0.0), logits.argmax(-1))
    g = torch.Generator().manual_seed(0)
    assert torch.equal(sample(logits, 1.0, top_k=1, generator=g), logits.argmax(-1))
    # top_p keeps the smallest set reaching p: probs 0.5, 0.3, 0.2 with p=0.75 -> {0, 1} only
    probs = torch.tensor([[0.5, 0.3, 0.2]]).log().expand(2000, 3)
    drawn = sample(probs, 1.0, top_p=0.75, generator=g)
    assert set(drawn.tolist()) == {0, 1}
    assert sample(probs, 1.0, top_p=0.5, generator=g).eq(0).all()
    assert set(sample(probs, 1.0, generator=g).tolist()) == {0, 1, 2}
    with pytest.raises(ValueError, match="top_p"):
        sample(logits, 1.0, top_p=0.0)


def test_greedy_generation_equals_recompute(model):
    prompt = [5, 17, 42, 8]
    assert generate(model, [prompt], max_new_tokens=12, temperature=0) == [greedy_by_recompute(model, prompt, 12)]


def test_left_padded_batch_equals_each_prompt_alone(model):
    prompts = [[3, 9], [100, 200, 300, 400, 250, 7, 1], [11, 12, 13, 14]]
    limits = [10, 6, 8]
    got = generate(model, prompts, max_new_tokens=limits, temperature=0)
    want = [greedy_by_recompute(model, p, n) for p, n in zip(prompts, limits)]
    assert got == want
    assert [len(g) for g in got] == limits


def test_stop_ids_end_each_row(model):
    prompts = [[3, 9], [100, 200, 300]]
    free = generate(model, prompts, max_new_tokens=10, temperature=0)
    stop = free[0][3]  # the 4th token of row 0 becomes its stop token
    got = generate(model, prompts, max_new_tokens=10, temperature=0, stop_ids=[stop])
    assert got[0] == free[0][: free[0].index(stop)]
    assert got[1] == (free[1][: free[1].index(stop)] if stop in free[1] else free[1])


def test_allowed_ids_and_stop_pass_through(model):
    lo, hi, stop = 300, 400, 7
    out = generate(model, [[1, 2, 3]] * 4, max_new_tokens=30, temperature=1.0, allowed_ids=(lo, hi), stop_ids=[stop],
                   generator=torch.Generator().manual_seed(0))
    assert all(lo <= t < hi for row in out for t in row) and sum(map(len, out)) > 0

    class LovesStop(Transformer):  # the stop token, outside (lo, hi), is by far the most likely
        def forward(self, *args, **kwargs):
            logits = super().forward(*args, **kwargs)
            logits[..., stop] += 1e3
            return logits

    biased = LovesStop(model.config).eval()
    biased.load_state_dict(model.state_dict())
    assert generate(biased, [[1, 2], [5]], max_new_tokens=5, temperature=0, allowed_ids=(lo, hi), stop_ids=[stop]) == [[], []]
    out = generate(biased, [[1, 2]], max_new_tokens=5, temperature=0, allowed_ids=(lo, hi))
    assert len(out[0]) == 5 and all(lo <= t < hi for t in out[0])


def test_generate_rejects_bad_input(model):
    with pytest.raises(ValueError, match="2 max_new_tokens for 1 prompts"):
        generate(model, [[1]], max_new_tokens=[1, 2])
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[]], max_new_tokens=2)
