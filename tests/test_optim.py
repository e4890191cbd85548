"""AdamWMaster: torch's AdamW update exactly, on fp32 master copies of bf16/fp16 weights."""

import pytest
import torch

from moecraft.train.optim import AdamWMaster


def _groups(params):
    return [{"params": params[:2], "weight_decay": 0.1}, {"params": params[2:], "weight_decay": 0.0}]


def _grads(step, shapes, dtype):
    gen = torch.Generator().manual_seed(100 + step)
    return [torch.randn(s, generator=gen).to(dtype) for s in shapes]


SHAPES = [(5, 7), (3,), (4, 4), (6,)]


def test_fp32_parameters_are_updated_bit_identically_to_torch_adamw():
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=gen) for s in SHAPES]
    ours = [torch.nn.Parameter(t.clone()) for t in init]
    ref = [torch.nn.Parameter(t.clone()) for t in init]
    opt = AdamWMaster(_groups(ours), lr=3e-3, betas=(0.8, 0.95), eps=1e-6)
    ref_opt = torch.optim.AdamW(_groups(ref), lr=3e-3, betas=(0.8, 0.95), eps=1e-6, foreach=False)
    for step in range(7):
        for p, q, g in zip(ours, ref, _grads(step, SHAPES, torch.float32)):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref_opt.step()
        assert all(torch.equal(p, q) for p, q in zip(ours, ref)), step
    assert all("master" not in opt.state[p] for p in ours)  # fp32 needs no copy


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_parameters_follow_an_fp32_adamw_rounded_each_step(dtype):
    """Reference: torch's AdamW on an fp32 copy fed the same (upcast) gradients; the low-precision weight
    must equal that copy rounded, after every step."""
    gen = torch.Generator().manual_seed(1)
    init = [torch.randn(s, generator=gen).to(dtype) for s in SHAPES]
    ours = [torch.nn.Parameter(t.clone()) for t in init]
    fp32 = [torch.nn.Parameter(t.float()) for t in init]
    opt = AdamWMaster(_groups(ours), lr=1e-5)
    ref_opt = torch.optim.AdamW(_groups(fp32), lr=1e-5, foreach=False)
    for step in range(20):
        for p, q, g in zip(ours, fp32, _grads(step, SHAPES, dtype)):
            p.grad, q.grad = g.clone(), g.float()
        opt.step()
        ref_opt.step()
        assert all(p.dtype == dtype and torch.equal(p, q.to(dtype)) for p, q in zip(ours, fp32)), step
        assert all(torch.equal(opt.state[p]["master"], q) for p, q in zip(ours, fp32)), step
    # the point of it: 20 steps of ~1e-5 moved the fp32 weights, and their rounding, where in-place
    # low-precision AdamW rounds each step away
    plain = [torch.nn.Parameter(t.clone()) for t in init]
    plain_opt = torch.optim.AdamW(_groups(plain), lr=1e-5, foreach=False)
    for step in range(20):
        for p, g in zip(plain, _grads(step, SHAPES, dtype)):
            p.grad = g.clone()
        plain_opt.step()
    moved = sum(int((p != t).sum()) for p, t in zip(ours, init))
    moved_plain = sum(int((p != t).sum()) for p, t in zip(plain, init))
    assert moved > moved_plain


def test_state_dict_round_trip_keeps_the_masters():
    params = [torch.nn.Parameter(torch.randn(4, 4).to(torch.bfloat16))]
    opt = AdamWMaster(params, lr=1e-3)
    params[0].grad = torch.ones(4, 4, dtype=torch.bfloat16)
    opt.step()
    copy = AdamWMaster([torch.nn.Parameter(params[0].detach().clone())], lr=1e-3)
    copy.load_state_dict(opt.state_dict())
    (state,) = copy.state.values()
    assert torch.equal(state["master"], opt.state[params[0]]["master"]) and state["master"].dtype == torch.float32
