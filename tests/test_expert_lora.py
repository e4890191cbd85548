"""LoRA on the selected experts only (``train --method esft --expert-adapter lora``).

Checked against plain-PyTorch re-computations: the base model run with its fused expert tensors replaced by
W + (alpha/r) B A on the selected rows (``torch.func.functional_call``), in float64 for gradients.
"""

import json
from types import SimpleNamespace

import pytest
import torch
from torch.func import functional_call

from moecraft.artifacts import load_artifact
from moecraft.commands.merge import MergeConfig, merge
from moecraft.errors import MoecraftError
from moecraft.esft.expert_lora import ADAPTERS
from moecraft.esft.sparse import sparse_modules
from moecraft.families import moe_layers
from moecraft.methods import get_method
from moecraft.models import tiny_model
from moecraft.train import TrainConfig, train

IDS = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(7))
PICKS = {"deepseek_v2": {"1": [2, 5, 11], "2": [0, 7]}, "gpt_oss": {"0": [1, 6], "1": [3]}}


def prepared(family: str, tmp_path, rank=4, alpha=8.0, dtype=torch.float32):
    ec = tmp_path / f"{family}.json"
    ec.write_text(json.dumps({"family": family, "experts": PICKS[family]}))
    cfg = SimpleNamespace(experts=str(ec), train_shared_experts=None, train_non_expert_modules=None,
                          expert_adapter="lora", lora_r=rank, lora_alpha=alpha, lora_dropout=0.0, seed=0)
    base, model = tiny_model(family).to(dtype), tiny_model(family).to(dtype)
    if dtype == torch.float64:  # torch's grouped GEMM has no float64 kernel: the eager expert loop has
        base.config._experts_implementation = model.config._experts_implementation = "eager"
    return base, get_method("esft").prepare(model, cfg), ec


def reference_params(base, model) -> dict[str, torch.Tensor]:
    """The base's fused expert tensors with (alpha/r) B A added to the selected rows, from the adapters alone."""
    out = {}
    for path, sparse in sparse_modules(model).items():
        lora = sparse.expert_lora
        for name in lora.names:
            w = dict(base.named_parameters())[f"{path}.{name}"]
            a, b = lora.lora_A[name], lora.lora_B[name]
            delta = torch.einsum("sor,sri->soi", b, a) * (lora.alpha / lora.rank)
            if lora.transposed:
                delta = delta.transpose(1, 2)
            rows = torch.tensor(sparse.expert_ids)
            out[f"{path}.{name}"] = w.index_put((rows,), w[rows] + delta)
    return out


@pytest.mark.parametrize("family", ["deepseek_v2", "gpt_oss"])
def test_forward_at_init_is_the_base_exactly(family, tmp_path):
    base, model, _ = prepared(family, tmp_path)
    with torch.no_grad():
        assert torch.equal(model.eval()(IDS).logits, base.eval()(IDS).logits)


@pytest.mark.parametrize("family", ["deepseek_v2", "gpt_oss"])
def test_forward_and_gradients_match_the_merged_weights_reference(family, tmp_path):
    base, model, _ = prepared(family, tmp_path, dtype=torch.float64)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # as if trained: B no longer zero
        for sparse in sparse_modules(model).values():
            for p in sparse.expert_lora.lora_B.values():
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.3)
    loss = model.train()(IDS, labels=IDS).loss
    loss.backward()
    # reference: the plain base with merged weights; gradients reach the same A and B through it
    adapters = [p for s in sparse_modules(model).values() for p in s.expert_lora.parameters()]
    ours = [p.grad.clone() for p in adapters]
    for p in adapters:
        p.grad = None
    ref_loss = functional_call(base.train(), reference_params(base, model), (IDS,), {"labels": IDS}).loss
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
    ref = torch.autograd.grad(ref_loss, adapters)
    for got, want in zip(ours, ref):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    # nothing else formed a gradient: not the selected experts' weights, not the frozen ones
    assert all(p.grad is None for p in model.parameters() if not any(p is q for q in adapters))


def test_optimiser_holds_exactly_the_selected_experts_adapters(tmp_path):
    ec = tmp_path / "ec.json"
    ec.write_text(json.dumps({"family": "deepseek_v2", "experts": PICKS["deepseek_v2"]}))
    r = 4
    s = train(TrainConfig(model="tiny:deepseek_v2", data="builtin:intent", out=str(tmp_path / "run"), experts=str(ec),
                          expert_adapter="lora", lora_r=r, lora_alpha=8, seq_len=256, max_steps=2,
                          eval_sequences=1, lr=1e-2, progress=False))
    base = tiny_model("deepseek_v2")
    expected = 0
    for layer in moe_layers(base):  # per selected expert and weight [out, in]: r * (in + out)
        n_sel = len(PICKS["deepseek_v2"].get(str(layer.index), []))
        for w in (layer.experts.gate_up_proj, layer.experts.down_proj):
            expected += n_sel * r * (w.shape[1] + w.shape[2])
    assert s["optimizer_parameters"] == expected
    full_esft = sum(len(v) for v in PICKS["deepseek_v2"].values()) * (64 * 64 + 64 * 32)
    assert expected < full_esft / 2
    # the artifact: adapters, no expert rows; loading folds them in and reproduces the trained model
    run = tmp_path / "run"
    assert (run / ADAPTERS).is_file()
    trained_model = s["model"].eval()
    with torch.no_grad():
        want = trained_model(IDS).logits
        assert not torch.allclose(want, base.eval()(IDS).logits)  # training moved the adapters
        got = load_artifact(tiny_model("deepseek_v2"), run).eval()(IDS).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    merge(MergeConfig(artifact=str(run), out=str(tmp_path / "merged")))
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()(IDS).logits
    torch.testing.assert_close(merged, want, rtol=1e-5, atol=1e-5)


def test_expert_adapter_refuses_dropout(tmp_path):
    ec = tmp_path / "ec.json"
    ec.write_text(json.dumps({"family": "deepseek_v2", "experts": PICKS["deepseek_v2"]}))
    cfg = SimpleNamespace(experts=str(ec), train_shared_experts=None, train_non_expert_modules=None,
                          expert_adapter="lora", lora_r=4, lora_alpha=8, lora_dropout=0.1, seed=0)
    with pytest.raises(MoecraftError, match="--lora-dropout 0"):
        get_method("esft").prepare(tiny_model("deepseek_v2"), cfg)
