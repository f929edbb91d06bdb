"""DeepSpeed's CPU Adam kernels resume bitwise once sftscale has wrapped them.

Both kernels (DeepSpeedCPUAdam for optimizer offload, FusedAdam under the CPU accelerator) keep
beta^t between steps and multiply it once per step, but compute it with pow() when a step number
arrives out of sequence -- as the first step after a resume does. The two disagree in the last bit.
"""

import os

import pytest
import torch

from sftscale.engine import make_adam_resumable

os.environ.setdefault("DS_ACCELERATOR", "cpu")
STEPS, STOP = 12, 7


def _optimizer(kind, param):
    if kind == "cpu_adam":
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam([param], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    from deepspeed.ops.adam import FusedAdam

    return FusedAdam([param], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)


def _train(kind, *, steps, wrap, state=None):
    """`steps` Adam steps on one parameter with seeded gradients; returns (param, state dict)."""
    param = torch.nn.Parameter(torch.linspace(-1, 1, 1003))  # not a multiple of the SIMD width
    opt = _optimizer(kind, param)
    if wrap:
        make_adam_resumable(opt)
    done = 0
    if state is not None:
        _as_in_a_new_process(kind)
        param.data.copy_(state["param"])
        opt.load_state_dict(state["opt"])
        done = state["done"]
    for step in range(done, steps):
        param.grad = torch.randn(param.shape, generator=torch.Generator().manual_seed(step))
        opt.step()
    return param.detach().clone(), {
        "param": param.detach().clone(),
        "opt": opt.state_dict(),
        "done": steps,
    }


def _as_in_a_new_process(kind):
    """FusedAdam's kernel cache is per process (DeepSpeedCPUAdam's per instance): one throwaway
    step leaves it where a fresh process would have it relative to the resumed step."""
    if kind == "fused_adam":
        p = torch.nn.Parameter(torch.zeros(8))
        p.grad = torch.ones(8)
        _optimizer(kind, p).step()


@pytest.mark.parametrize("kind", ["cpu_adam", "fused_adam"])
def test_resumed_adam_matches_uninterrupted_bitwise(kind):
    uninterrupted, _ = _train(kind, steps=STEPS, wrap=True)
    _, saved = _train(kind, steps=STOP, wrap=True)
    resumed, _ = _train(kind, steps=STEPS, wrap=True, state=saved)
    assert torch.equal(resumed, uninterrupted)


@pytest.mark.parametrize("kind", ["cpu_adam", "fused_adam"])
def test_unwrapped_kernel_drifts_after_resume(kind):
    """The reason for the wrapper: without it the same resume differs in the last bits."""
    uninterrupted, _ = _train(kind, steps=STEPS, wrap=False)
    _, saved = _train(kind, steps=STOP, wrap=False)
    resumed, _ = _train(kind, steps=STEPS, wrap=False, state=saved)
    assert not torch.equal(resumed, uninterrupted)
    torch.testing.assert_close(resumed, uninterrupted, rtol=1e-5, atol=1e-6)
