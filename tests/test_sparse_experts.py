"""SparseExperts: same routing and outputs as the unmodified model, gradients only for selected experts."""

import copy

import pytest
import torch

from moecraft.errors import MoecraftError
from moecraft.esft.sparse import (
    SparseExperts,
    _child_name,
    apply_sparse_experts,
    remove_sparse_experts,
    sparse_modules,
)
from moecraft.families import moe_layers
from moecraft.models import tiny_model

FAMILIES = ["deepseek_v2", "qwen3_moe", "mixtral", "gpt_oss"]


def _model(kind, impl="grouped_mm", dtype=torch.float32):
    m = tiny_model(kind).to(dtype)
    m.config._experts_implementation = impl
    return m


def _selection(model):
    idx = [layer.index for layer in moe_layers(model)]
    return {idx[0]: [1, 2], idx[-1]: [0, 3, 5]} if len(idx) > 1 else {idx[0]: [0, 3, 5]}


def _ids(seed=0, shape=(2, 24)):
    return torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("impl", ["eager", "grouped_mm", "batched_mm"])
@pytest.mark.parametrize("kind", FAMILIES)
def test_forward_bit_identical_and_reversible(kind, impl):
    base = _model(kind, impl)
    ids = _ids()
    with torch.no_grad():
        ref = base(ids).logits
    wrapped = copy.deepcopy(base)
    apply_sparse_experts(wrapped, _selection(wrapped))
    assert len(sparse_modules(wrapped)) == len(_selection(wrapped))
    with torch.no_grad():
        assert torch.equal(wrapped(ids).logits, ref)  # CPU float32: bit-identical
    remove_sparse_experts(wrapped)
    sd_ref, sd = base.state_dict(), wrapped.state_dict()
    assert sd.keys() == sd_ref.keys()
    assert all(torch.equal(sd[k], sd_ref[k]) for k in sd)


def _fused_grad_rows(model, sel):
    """Dense reference: gradients of the unmodified fused tensors, rows of the selected experts."""
    out = {}
    for layer in moe_layers(model):
        if layer.index in sel:
            for name, p in layer.experts.named_parameters(recurse=False):
                out[(layer.index, name)] = p.grad[sel[layer.index]]
    return out


def _only_selected_trainable(base):
    """A copy of ``base`` with sparse experts in which only the selected experts require grad."""
    wrapped = copy.deepcopy(base)
    sel = _selection(base)
    apply_sparse_experts(wrapped, sel)
    wrapped.requires_grad_(False)
    for m in sparse_modules(wrapped).values():
        m.trainable.requires_grad_(True)
    return wrapped, sel


@pytest.mark.parametrize("kind", FAMILIES)
def test_gradients_only_for_selected_experts(kind):
    base = _model(kind, "eager", torch.float64)
    wrapped, sel = _only_selected_trainable(base)
    ids = _ids(1)
    base(ids, labels=ids).loss.backward()
    wrapped(ids, labels=ids).loss.backward()
    ref = _fused_grad_rows(base, sel)
    by_layer = {layer.index: layer.experts for layer in moe_layers(wrapped)}
    for (li, name), g in ref.items():
        sparse = by_layer[li]
        assert isinstance(sparse, SparseExperts)
        got = getattr(sparse.trainable, name).grad
        assert got.shape == g.shape
        torch.testing.assert_close(got, g, rtol=1e-10, atol=1e-12)
        frozen = getattr(sparse.frozen, name)
        assert not frozen.requires_grad and frozen.grad is None
    assert all(p.grad is None for p in wrapped.parameters() if not p.requires_grad)


@pytest.mark.parametrize(("kind", "impl", "dtype", "tol"), [
    ("deepseek_v2", "eager", torch.float64, 1e-12),
    ("qwen3_moe", "eager", torch.float64, 1e-12),
    ("mixtral", "eager", torch.float64, 1e-12),
    ("deepseek_v2", "grouped_mm", torch.float32, 1e-6),
])
def test_one_adamw_step_matches_masked_dense_reference(kind, impl, dtype, tol):
    """Sparse step == plain AdamW on the full fused tensors with unselected grads zeroed, no decay on them."""
    lr, wd = 1e-3, 0.1
    base = _model(kind, impl, dtype)
    wrapped, sel = _only_selected_trainable(base)
    params = [p for p in wrapped.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    ids = _ids(2)
    wrapped(ids, labels=ids).loss.backward()
    opt.step()
    # reference: fused tensors, masked gradients, decoupled decay only on the selected rows
    base.requires_grad_(False)
    fused = [(layer, p) for layer in moe_layers(base) if layer.index in sel
             for p in layer.experts.parameters(recurse=False)]
    for _, p in fused:
        p.requires_grad_(True)
    ref_opt = torch.optim.AdamW([p for _, p in fused], lr=lr, weight_decay=0.0)
    base(ids, labels=ids).loss.backward()
    with torch.no_grad():
        for layer, p in fused:
            mask = torch.zeros(p.shape[0], dtype=torch.bool)
            mask[sel[layer.index]] = True
            p.grad[~mask] = 0
            p[mask] -= lr * wd * p[mask]
    ref_opt.step()
    remove_sparse_experts(wrapped)
    sd, sd_ref = wrapped.state_dict(), base.state_dict()
    orig = tiny_model(kind).to(dtype).state_dict()
    n_changed = 0
    for k in sd:
        torch.testing.assert_close(sd[k], sd_ref[k], rtol=tol, atol=tol)
        n_changed += int(not torch.equal(sd[k], orig[k])) if "experts" in k else 0
    assert n_changed > 0
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == sum(
        p[sel[layer.index]].numel() for layer, p in fused)


def test_bad_selection_errors():
    m = tiny_model("deepseek_v2")
    with pytest.raises(MoecraftError, match="not MoE layers"):
        apply_sparse_experts(m, {0: [1]})  # layer 0 is dense
    with pytest.raises(MoecraftError, match="out of range"):
        apply_sparse_experts(m, {1: [99]})


def _parameter_bytes(model) -> int:
    """Bytes of the distinct storages behind the model's parameters (shared storage counted once)."""
    storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters()}
    return sum(storages.values())


@pytest.mark.parametrize("kind", FAMILIES)
def test_wrapping_costs_no_memory_once_done(kind):
    """The frozen experts are copied out and the original tensors freed (steady state: the same bytes)."""
    import gc
    import weakref

    model = _model(kind)
    before = _parameter_bytes(model)
    originals = [weakref.ref(layer.experts) for layer in moe_layers(model) if layer.index in _selection(model)]
    apply_sparse_experts(model, _selection(model))
    gc.collect()
    assert all(ref() is None for ref in originals)
    assert _parameter_bytes(model) == before


@pytest.mark.parametrize("kind", FAMILIES)
def test_shared_frozen_experts_add_only_the_selected_experts_memory(kind):
    """share_frozen (expert parallelism, where the original tensors stay alive): no copy of the frozen
    experts, and the same outputs and fused tensors as the unwrapped model."""
    model = _model(kind)
    ids = _ids()
    with torch.no_grad():
        ref = model(ids).logits
    before = _parameter_bytes(model)
    pairs, selected = [], 0
    for layer in moe_layers(model):
        if layer.index in _selection(model):
            sparse = SparseExperts(layer.experts, _selection(model)[layer.index], share_frozen=True)
            setattr(layer.block, _child_name(layer.block, layer.experts), sparse)
            pairs.append((sparse, layer.experts))
            selected += sum(getattr(sparse.trainable, n).numel() * getattr(sparse.trainable, n).element_size()
                            for n in sparse.param_names)
    assert _parameter_bytes(model) - before == selected  # the frozen group is the original tensors
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref)
    for sparse, original in pairs:
        for name, full in sparse.fused().items():
            assert torch.equal(full, getattr(original, name))
