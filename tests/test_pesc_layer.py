"""PESC layer: output against a plain per-expert loop (float64), grouped products, the Switch aux loss."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from moecraft.pesc.layer import PescMoE, grouped_mm


class _FFN(nn.Module):
    def __init__(self, h, i):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = nn.Linear(h, i, bias=False), nn.Linear(h, i), nn.Linear(i, h)
        self.act_fn = nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def _layer(kind, h=24, i=40, e=5, k=2, r=6, seed=0):
    torch.manual_seed(seed)
    layer = PescMoE(_FFN(h, i), h, i, num_experts=e, top_k=k, rank=r, scaling=0.25, expert=kind)
    layer.reset_parameters(torch.Generator().manual_seed(seed))
    with torch.no_grad():  # non-zero up/B so the experts matter
        for name, p in layer.experts.named_parameters():
            if "up" in name or "B" in name:
                p.normal_(0, 0.3)
    return layer.double().eval()


def _reference(layer, x):
    """Plain PyTorch: per token, softmax over its top-k logits, then a Python loop over chosen experts."""
    ffn, s, ex = layer.ffn, layer.scaling, layer.experts
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        logits = x[t] @ layer.router.weight.T
        top, idx = torch.topk(logits, layer.top_k)
        w = torch.exp(top - top.max()) / torch.exp(top - top.max()).sum()
        y = ffn(x[t])
        acc = y.clone() if layer.expert_kind == "adapter" else torch.zeros_like(y)
        for wj, e in zip(w, idx.tolist()):
            if layer.expert_kind == "adapter":
                acc += wj * s * (F.gelu(y @ ex.down[e]) @ ex.up[e])
            else:
                r = layer.rank
                wg = ffn.gate_proj.weight + s * (ex.gate_up_A[e][:, :r] @ ex.gate_B[e]).T
                wu = ffn.up_proj.weight + s * (ex.gate_up_A[e][:, r:] @ ex.up_B[e]).T
                wd = ffn.down_proj.weight + s * (ex.down_A[e] @ ex.down_B[e]).T
                hid = F.silu(x[t] @ wg.T) * (x[t] @ wu.T + ffn.up_proj.bias)
                acc += wj * (hid @ wd.T + ffn.down_proj.bias)
        out[t] = acc
    return out


@pytest.mark.parametrize("kind", ["adapter", "lora"])
def test_layer_matches_per_expert_loop_float64(kind):
    layer = _layer(kind)
    x = torch.randn(2, 9, 24, dtype=torch.float64)
    got = layer(x)
    assert got.shape == x.shape
    ref = _reference(layer, x.reshape(-1, 24)).reshape(x.shape)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind", ["adapter", "lora"])
def test_zero_init_equals_dense_ffn(kind):
    layer = _layer(kind)
    layer.reset_parameters(torch.Generator().manual_seed(1))  # up / B back to zero
    x = torch.randn(7, 24, dtype=torch.float64)
    torch.testing.assert_close(layer(x), layer.ffn(x), rtol=1e-12, atol=1e-12)


def test_grouped_mm_matches_loop_and_gradients():
    torch.manual_seed(0)
    counts = torch.tensor([3, 0, 5, 1])
    x = torch.randn(9, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 6, 3, dtype=torch.float64, requires_grad=True)
    got = grouped_mm(x, w, counts)
    bounds = [0, 3, 3, 8, 9]
    ref = torch.cat([x[bounds[g]:bounds[g + 1]] @ w[g] for g in range(4)])
    torch.testing.assert_close(got, ref)
    gx, gw = torch.autograd.grad(got.square().sum(), (x, w))
    rx, rw = torch.autograd.grad(ref.square().sum(), (x, w))
    torch.testing.assert_close(gx, rx)
    torch.testing.assert_close(gw, rw)


def test_aux_loss_hand_computation_and_gradient():
    layer = _layer("adapter", e=4, k=2)
    x = torch.randn(11, 24, dtype=torch.float64)
    layer(x)
    logits = x @ layer.router.weight.T
    probs = torch.exp(logits) / torch.exp(logits).sum(-1, keepdim=True)
    chosen = torch.topk(logits, 2).indices
    f = torch.tensor([(chosen == i).sum().item() / (11 * 2) for i in range(4)], dtype=torch.float64)
    expected = 4 * (f * probs.mean(0)).sum()
    torch.testing.assert_close(layer.last_aux_loss, expected)
    torch.testing.assert_close(layer.last_usage, f)
    (g,) = torch.autograd.grad(layer.last_aux_loss, layer.router.weight)
    assert g.abs().sum() > 0  # P carries the router gradient


def test_aux_loss_balanced_vs_collapsed():
    h, e = 8, 4
    layer = _layer("adapter", h=h, e=e, k=1)
    x = torch.randn(64, h, dtype=torch.float64)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[0].fill_(50.0)  # collapsed: every positive-sum token to expert 0
    x_pos = x.abs()
    layer(x_pos)
    collapsed = layer.last_aux_loss.item()
    assert layer.last_usage[0].item() == 1.0
    with torch.no_grad():  # balanced: a router that sends token t to expert t % e with probability ~1
        layer.router.weight.copy_(torch.eye(e, h, dtype=torch.float64) * 50.0)
    xb = torch.zeros(64, h, dtype=torch.float64)
    xb[torch.arange(64), torch.arange(64) % e] = 1.0
    layer(xb)
    balanced = layer.last_aux_loss.item()
    torch.testing.assert_close(layer.last_usage, torch.full((e,), 1 / e, dtype=torch.float64))
    assert balanced == pytest.approx(1.0, abs=1e-6)  # E * sum (1/E)(1/E) = 1, the minimum
    assert collapsed == pytest.approx(float(e), abs=1e-6)  # E * 1 * 1 = E, the maximum


def _switch_by_hand(x, router_weight, e, k):
    """E * sum_i f_i P_i over the rows of ``x`` (plain float64 PyTorch, its own top-k and softmax)."""
    logits = x @ router_weight.T
    probs = torch.exp(logits - logits.max(-1, keepdim=True).values)
    probs = probs / probs.sum(-1, keepdim=True)
    chosen = torch.topk(logits, k).indices
    f = torch.tensor([(chosen == i).sum().item() / (x.shape[0] * k) for i in range(e)], dtype=torch.float64)
    return e * (f * probs.mean(0)).sum(), f


@pytest.mark.parametrize("kind", ["adapter", "lora"])
def test_aux_loss_ignores_padding_float64(kind):
    layer = _layer(kind, e=4, k=2)
    x = torch.randn(2, 6, 24, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    layer.token_mask = mask
    out = layer(x)
    padded_loss, padded_usage = layer.last_aux_loss, layer.last_usage
    real = x[mask.bool()]  # the 9 real tokens
    expected, f = _switch_by_hand(real, layer.router.weight, 4, 2)
    torch.testing.assert_close(padded_loss, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(padded_usage, f, rtol=0, atol=1e-15)
    counted_padding, _ = _switch_by_hand(x.reshape(-1, 24), layer.router.weight, 4, 2)
    assert abs(counted_padding.item() - expected.item()) > 1e-3  # the padding would have changed it
    # the same real tokens without padding: same loss, same usage, same outputs on the real tokens
    layer.token_mask = None
    out_real = layer(real)
    torch.testing.assert_close(layer.last_aux_loss, padded_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.last_usage, padded_usage, rtol=0, atol=1e-15)
    torch.testing.assert_close(out[mask.bool()], out_real, rtol=1e-12, atol=1e-12)
    # P still carries the router gradient, and only the real tokens' probabilities reach it
    layer.token_mask = mask
    layer(x)
    (g,) = torch.autograd.grad(layer.last_aux_loss, layer.router.weight)
    layer.token_mask = None
    layer(real)
    (g_real,) = torch.autograd.grad(layer.last_aux_loss, layer.router.weight)
    torch.testing.assert_close(g, g_real, rtol=1e-10, atol=1e-12)


def test_aux_loss_all_padding_is_a_zero_with_a_graph():
    layer = _layer("adapter", e=4, k=2)
    layer.token_mask = torch.zeros(1, 5, dtype=torch.long)
    layer(torch.randn(1, 5, 24, dtype=torch.float64))
    assert layer.last_aux_loss.item() == 0.0 and layer.last_aux_loss.requires_grad
    assert layer.last_usage.sum().item() == 0.0
    layer.token_mask = torch.ones(1, 4, dtype=torch.long)  # a mask of another forward is an error, not a guess
    layer(torch.randn(1, 5, 24, dtype=torch.float64))
    with pytest.raises(ValueError, match="4 entries for 5"):
        _ = layer.last_aux_loss
