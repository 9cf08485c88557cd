"""The chunked output-layer cross-entropy equals the plain one, in value and gradients, and keeps no full logits."""

import pytest
import torch
import torch.nn.functional as F

from lit_keomni.configs import TransformerConfig
from lit_keomni.nn.losses import chunked_cross_entropy, token_cross_entropy
from lit_keomni.nn.transformer import Transformer


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_chunked_loss_and_gradients_equal_the_plain_ones(chunk):
    torch.manual_seed(0)
    hidden = torch.randn(3, 21, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 50, (3, 21))
    target[0, :5] = -100
    target[2, -3:] = -100
    upstream = torch.rand(3, 21, dtype=torch.float64)  # any weighting of the per-token losses, as a mean would give

    losses, predicted = chunked_cross_entropy(hidden, weight, target, chunk)
    (losses * upstream).sum().backward()
    g_hidden, g_weight = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None

    logits = hidden @ weight.T
    plain = F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=-100, reduction="none").view(3, 21)
    (plain * upstream).sum().backward()
    torch.testing.assert_close(losses, plain.float(), rtol=1e-6, atol=1e-6)
    assert torch.equal(predicted, logits.argmax(-1)) and (losses[target == -100] == 0).all()
    torch.testing.assert_close(g_hidden, hidden.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_weight, weight.grad, rtol=1e-5, atol=1e-6)


def test_transformer_loss_path_equals_its_logits():
    torch.manual_seed(0)
    model = Transformer(TransformerConfig.from_name("tiny", n_layer=2, n_embd=32, n_head=4, n_kv_head=2,
                                                    intermediate_size=64, vocab_size=90))
    x = torch.randint(0, 90, (2, 12))
    target = torch.randint(0, 90, (2, 12))
    target[1, :4] = -100
    grads = []
    for chunk in (0, 5):
        model.zero_grad()
        losses, predicted = model(x, targets=target, loss_chunk=chunk)
        (losses.sum() / (target != -100).sum()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        ref_losses, ref_pred = token_cross_entropy(model(x), target)
        torch.testing.assert_close(losses, ref_losses)
        assert torch.equal(predicted, ref_pred)
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-6, msg=n)


def test_chunked_loss_keeps_one_chunk_of_logits():
    """What autograd keeps for backward: the hidden states, the weight and the targets, never (tokens, vocab)."""
    hidden = torch.randn(256, 8, requires_grad=True)
    weight = torch.randn(4000, 8, requires_grad=True)
    target = torch.randint(0, 4000, (256,))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        chunked_cross_entropy(hidden, weight, target, 16)[0].sum().backward()
    assert max(saved) == weight.numel() and sum(saved) == hidden.numel() + weight.numel() + target.numel()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        token_cross_entropy(hidden @ weight.T, target)[0].sum()
    assert max(saved) >= 256 * 4000  # the plain loss keeps the full logits
