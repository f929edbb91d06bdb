"""Chunked cross-entropy (train.loss_chunk_tokens) gives the plain loss and its gradient."""

import pytest
import torch

from sftscale.data import IGNORE_INDEX
from sftscale.loss import token_loss_sum


@pytest.mark.parametrize("chunk", [1, 7, 16, 99, 100, 1000])
def test_chunked_loss_equals_plain_loss_and_gradient(chunk):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 50, 33, generator=g).to(torch.bfloat16).requires_grad_()
    targets = torch.randint(0, 33, (2, 50), generator=g)
    targets[0, :20] = IGNORE_INDEX  # a prompt
    targets[1, 40:] = IGNORE_INDEX  # padding
    plain = token_loss_sum(logits, targets)
    (plain_grad,) = torch.autograd.grad(plain, logits)
    chunked = token_loss_sum(logits, targets, chunk_tokens=chunk)
    (chunked_grad,) = torch.autograd.grad(chunked, logits)
    assert chunked.dtype == torch.float32
    torch.testing.assert_close(chunked, plain, rtol=1e-6, atol=0)  # fp32 summation order only
    assert torch.equal(chunked_grad, plain_grad)


def test_chunked_loss_of_a_batch_without_supervision_still_backpropagates():
    logits = torch.randn(1, 10, 5).requires_grad_()
    targets = torch.full((1, 10), IGNORE_INDEX)
    loss = token_loss_sum(logits, targets, chunk_tokens=3)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(logits.grad, torch.zeros_like(logits))


@pytest.mark.parametrize("tiles", [1, 3, 100, 150])  # 150 > positions: some tiles are empty
def test_tiled_head_loss_equals_the_loss_of_the_whole_logits(tiles):
    from sftscale.loss import tiled_head_loss_sum

    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(16, 33, bias=False)
    hidden = torch.randn(2, 50, 16, generator=g).requires_grad_()
    targets = torch.randint(0, 33, (2, 50), generator=g)
    targets[0, :20] = IGNORE_INDEX
    plain = token_loss_sum(head(hidden), targets)
    grads = torch.autograd.grad(plain, [hidden, head.weight])
    calls = []
    head.register_forward_hook(lambda *_: calls.append(1))
    tiled = tiled_head_loss_sum(hidden, head, targets, tiles=tiles)
    assert len(calls) == tiles  # one head call per tile, empty or not (ZeRO-3 gathers per call)
    tiled_grads = torch.autograd.grad(tiled, [hidden, head.weight])
    torch.testing.assert_close(tiled, plain, rtol=1e-6, atol=0)
    for a, b in zip(tiled_grads, grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
