"""LoRA baseline on every tiny MoE family: exactly the intended targets (attention, dense and shared MLPs;
the routed experts only with ``lora_experts``), no peft pattern warnings, the trained model against a
float64 hand-merged reference, save -> load -> merge."""

import warnings
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from moecraft.errors import MoecraftError
from moecraft.families import FAMILIES, moe_layers
from moecraft.methods import get_method
from moecraft.models import tiny_model

FAMILY_NAMES = sorted(FAMILIES)
R, ALPHA = 4, 8


def _tiny64(kind: str) -> nn.Module:
    model = tiny_model(kind).double()
    model.set_experts_implementation("eager")  # the grouped_mm kernel has no float64
    return model


def _cfg(experts: bool, dropout: float = 0.0) -> SimpleNamespace:
    return SimpleNamespace(lora_r=R, lora_alpha=ALPHA, lora_dropout=dropout, lora_experts=experts)


def _expected_targets(base: nn.Module) -> tuple[set[str], set[str]]:
    """(Linear modules that should get LoRA, fused routed-expert tensors), read off the plain model."""
    routers = {id(layer.router) for layer in moe_layers(base)}
    linears = {n for n, m in base.named_modules()
               if isinstance(m, nn.Linear) and id(m) not in routers and m is not base.get_output_embeddings()}
    fused = {n for n, p in base.named_parameters() if p.dim() == 3}  # [E, ., .] expert stacks (no biases)
    return linears, fused


def _adapted(model) -> tuple[dict[str, nn.Module], dict[str, nn.Module]]:
    """(LoRA-wrapped Linear modules, LoRA-wrapped parameters) of a peft model, by base-model name."""
    from peft.tuners.lora import LoraLayer, ParamWrapper

    linears, params = {}, {}
    for name, mod in model.base_model.model.named_modules():
        if isinstance(mod, ParamWrapper):
            owner = name
            while owner.endswith(".base_layer"):  # nested wrappers for several tensors of one module
                owner = owner[: -len(".base_layer")]
            params[f"{owner}.{mod.parameter_name}"] = mod
        elif isinstance(mod, LoraLayer):
            linears[name] = mod
    return linears, params


def _lora_weights(layer) -> list[nn.Parameter]:
    return [layer.lora_A["default"].weight, layer.lora_B["default"].weight]


@pytest.mark.parametrize("kind", FAMILY_NAMES)
@pytest.mark.parametrize("experts", [False, True])
def test_targets_exactly_and_no_pattern_warnings(kind, experts):
    want_linears, want_fused = _expected_targets(tiny_model(kind))
    method = get_method("lora")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = method.prepare(tiny_model(kind), _cfg(experts))
    peft_msgs = [str(w.message) for w in caught if "pattern" in str(w.message) or "match" in str(w.message)]
    assert peft_msgs == []  # e.g. "alpha_pattern keys did not match any targeted module: ['.*\\.gate_up_proj']"
    lcfg = model.peft_config["default"]
    assert not lcfg.rank_pattern and not lcfg.alpha_pattern

    linears, params = _adapted(model)
    assert set(linears) == want_linears  # dense and shared-expert MLPs included, routers and head left alone
    assert set(params) == (want_fused if experts else set())
    for layer in [*linears.values(), *params.values()]:
        assert layer.r["default"] == R and layer.scaling["default"] == ALPHA / R

    # the optimiser gets exactly these LoRA tensors; everything else is frozen
    held = [p for g in method.param_groups(model, 0.0) for p in g["params"]]
    expected = [w for layer in [*linears.values(), *params.values()] for w in _lora_weights(layer)]
    assert len(held) == len(expected) and {id(p) for p in held} == {id(p) for p in expected}
    assert {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for p in expected}


def _merged_by_hand(kind: str, model) -> nn.Module:
    """A fresh float64 base with every LoRA delta added by plain PyTorch: W + (alpha/r) B A per Linear, and per
    routed expert e, W_e + (alpha/r) B_e A_e with that expert's own r rows of A and r columns of B."""
    ref = _tiny64(kind)
    linears, params = _adapted(model)
    s = ALPHA / R
    with torch.no_grad():
        for name, layer in linears.items():
            a, b = (w.detach() for w in _lora_weights(layer))
            ref.get_submodule(name).weight += s * b @ a
        for name, layer in params.items():
            a, b = (w.detach() for w in _lora_weights(layer))
            owner = name.rpartition(".")[0]
            w = ref.get_parameter(name)
            # transformers stores expert stacks as [E, out, in] (nn.Linear-like) unless the module says otherwise
            in_out = getattr(ref.get_submodule(owner), "is_transposed", False)
            e, d_in, d_out = w.shape[0], a.shape[1], b.shape[0]
            assert a.shape[0] == b.shape[1] == R * e and w.shape[1:] == ((d_in, d_out) if in_out else (d_out, d_in))
            a_e = a.reshape(e, R, d_in)  # peft's storage: expert-major rows of A, expert-minor columns of B
            b_e = b.reshape(d_out, R, e).permute(2, 0, 1)
            delta = s * b_e @ a_e  # [E, out, in]
            w += delta.transpose(1, 2) if in_out else delta
    return ref.eval()


@pytest.mark.parametrize("kind", ["deepseek_v2", "gpt_oss", "qwen2_moe"])
def test_lora_experts_trains_the_experts_float64(kind, tmp_path):
    ids = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(1))
    method = get_method("lora")
    model = method.prepare(_tiny64(kind), _cfg(True))
    model.train()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(method.param_groups(model, 0.0), lr=1e-2)
    model(ids, labels=ids).loss.backward()
    opt.step()
    model.eval()

    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), f"frozen {n} changed"
    changed = {n for n, p in model.named_parameters() if n in lora and not torch.equal(p, lora[n])}
    assert changed and all(".lora_B." in n for n in changed)  # one step from B = 0: only B moves
    _, params = _adapted(model)
    assert params
    for layer in params.values():
        assert layer.lora_B["default"].weight.abs().sum() > 0, "an expert LoRA B did not train"

    with torch.no_grad():
        got = model(ids).logits
        torch.testing.assert_close(got, _merged_by_hand(kind, model)(ids).logits, rtol=1e-9, atol=1e-11)
        saved_b = {n: layer.lora_B["default"].weight.clone() for n, layer in params.items()}
        for layer in params.values():  # the experts' LoRA alone moves the output
            layer.lora_B["default"].weight.zero_()
        without = model(ids).logits
        for n, layer in params.items():
            layer.lora_B["default"].weight.copy_(saved_b[n])
    assert (got - without).abs().max() > 1e-6

    method.save(model, tmp_path, None)
    loaded = method.load(_tiny64(kind), tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, got)
        merged = method.merge(loaded)
        torch.testing.assert_close(merged(ids).logits, got, rtol=1e-9, atol=1e-11)


def test_lora_experts_train_save_load_through_the_loop(tmp_path):
    from moecraft.train import TrainConfig, train

    s = train(TrainConfig(model="tiny:deepseek_v2", data="builtin:intent", out=str(tmp_path / "run"), method="lora",
                          lora_experts=True, seq_len=128, max_steps=2, eval_sequences=1, lr=1e-2, progress=False))
    base = tiny_model("deepseek_v2")
    _, fused = _expected_targets(base)
    _, params = _adapted(s["model"])
    assert set(params) == fused
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(2))
    loaded = get_method("lora").load(base, tmp_path / "run").eval()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, s["model"].eval()(ids).logits)


def test_lora_experts_with_dropout_is_a_clear_error():
    with pytest.raises(MoecraftError, match="lora_experts needs lora_dropout 0"):
        get_method("lora").prepare(tiny_model("mixtral"), _cfg(True, dropout=0.05))
