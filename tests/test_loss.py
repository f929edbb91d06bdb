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
