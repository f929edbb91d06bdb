"""The optimizers a run steps with resume bitwise.

torch's fused AdamW (the default: optim.kernel=auto without optimizer offload) keeps its step
count as a tensor in its state and computes the bias corrections from it on every step, so a
resumed run's update is a function of the saved state alone.

DeepSpeed's CPU Adam (optimizer offload) keeps beta^t between steps and multiplies it once per
step, but computes it with pow() when a step number arrives out of sequence -- as the first step
after a resume does. The two disagree in the last bit; sftscale.engine.make_adam_resumable
makes every step take the pow() path. Its JIT op is built on first use (a minute or two on
2 cores) where this machine can build it, as a run with an offload template would.
"""

import os

import pytest
import torch

from sftscale.engine import make_adam_resumable

os.environ.setdefault("DS_ACCELERATOR", "cpu")
STEPS, STOP = 12, 7
KINDS = ["torch_fused", pytest.param("cpu_adam", marks=pytest.mark.builds_ops("cpu_adam"))]


def _optimizer(kind, param):
    if kind == "cpu_adam":
        from sftscale.jit_locks import missing_build_tools

        missing = missing_build_tools("CPUAdamBuilder")
        if missing:
            pytest.skip(f"DeepSpeed's CPU Adam cannot be built here: install {missing}")
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam([param], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    return torch.optim.AdamW([param], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, fused=True)


def _train(kind, *, steps, wrap, state=None):
    """`steps` Adam steps on one parameter with seeded gradients; returns (param, state dict)."""
    param = torch.nn.Parameter(torch.linspace(-1, 1, 1003))  # not a multiple of the SIMD width
    opt = _optimizer(kind, param)
    if wrap:
        make_adam_resumable(opt)
    done = 0
    if state is not None:
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


@pytest.mark.parametrize("kind", KINDS)
def test_resumed_adam_matches_uninterrupted_bitwise(kind):
    uninterrupted, _ = _train(kind, steps=STEPS, wrap=True)
    _, saved = _train(kind, steps=STOP, wrap=True)
    resumed, _ = _train(kind, steps=STEPS, wrap=True, state=saved)
    assert torch.equal(resumed, uninterrupted)


@pytest.mark.builds_ops("cpu_adam")
def test_unwrapped_cpu_adam_drifts_after_resume():
    """The reason for the wrapper: without it the same resume differs in the last bits."""
    uninterrupted, _ = _train("cpu_adam", steps=STEPS, wrap=False)
    _, saved = _train("cpu_adam", steps=STOP, wrap=False)
    resumed, _ = _train("cpu_adam", steps=STEPS, wrap=False, state=saved)
    assert not torch.equal(resumed, uninterrupted)
    torch.testing.assert_close(resumed, uninterrupted, rtol=1e-5, atol=1e-6)


def test_torch_adamw_needs_no_wrapper():
    """torch's fused AdamW resumes bitwise by itself: the wrapper leaves it alone."""
    uninterrupted, _ = _train("torch_fused", steps=STEPS, wrap=False)
    _, saved = _train("torch_fused", steps=STOP, wrap=False)
    resumed, _ = _train("torch_fused", steps=STEPS, wrap=False, state=saved)
    assert torch.equal(resumed, uninterrupted)


def test_a_shared_step_counter_is_unshared_after_a_load():
    """DeepSpeed's universal-checkpoint load hands every sub-group the same `step` object;
    torch's AdamW advances it in place once per sub-group, so it must be unshared."""
    from sftscale.checkpoint import unshare_step_counters

    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(5))
    opt = torch.optim.AdamW([a, b], lr=1e-2, fused=True)
    shared = torch.tensor(7.0)
    for p in (a, b):
        opt.state[p] = {
            "step": shared,
            "exp_avg": torch.zeros_like(p),
            "exp_avg_sq": torch.zeros_like(p),
        }
    unshare_step_counters(opt)
    a.grad, b.grad = torch.ones(3), torch.ones(5)
    opt.step()
    assert [opt.state[p]["step"].item() for p in (a, b)] == [8.0, 8.0]
