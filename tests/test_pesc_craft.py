"""PESC crafting on tiny Llama / Mistral / Qwen2 (+ Qwen3): step-0 equivalence, training touches only
trainable tensors, save -> load round trip, the training-method integration and the CLI."""

import pytest
import torch
from safetensors.torch import load_file

from moecraft.cli import main
from moecraft.errors import MoecraftError
from moecraft.methods import get_method
from moecraft.models import byte_tokenizer, tiny_model
from moecraft.pesc import (
    CraftConfig,
    craft_model,
    generate,
    load_artifact,
    mark_trainable,
    pesc_layers,
    save_artifact,
)
from moecraft.pesc.craft import WEIGHTS

KINDS = ["llama", "mistral", "qwen2"]


def _ids(seed=0):
    return torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(seed))


def _qwen3():
    from transformers import AutoModelForCausalLM, Qwen3Config

    tok = byte_tokenizer()
    cfg = Qwen3Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).eval()


@pytest.mark.parametrize("kind", [*KINDS, "qwen3"])
@pytest.mark.parametrize("expert", ["adapter", "lora"])
def test_crafted_equals_dense_at_step0(kind, expert):
    model = _qwen3() if kind == "qwen3" else tiny_model(kind)
    ids = _ids()
    with torch.no_grad():
        dense = model(ids).logits
        craft_model(model, CraftConfig(expert=expert, num_experts=4, top_k=2, adapter_dim=8))
        crafted = model(ids).logits
    layers = pesc_layers(model)
    assert [i for i, _ in layers] == [0, 1]
    # The FFN is shared by reference, not copied (the default base LoRA wraps its projections: not counted).
    assert sum(p.numel() for n, p in model.named_parameters() if ".mlp.ffn." in n and ".lora_" not in n) == 2 * 3 * 64 * 128
    if expert == "adapter":
        assert torch.equal(crafted, dense)  # y + sum_k w_k * 0 is y exactly
    else:  # sum_k w_k h with sum_k w_k = 1 up to rounding
        torch.testing.assert_close(crafted, dense, rtol=1e-5, atol=1e-5)


def test_bad_options_are_named():
    model = tiny_model("llama")
    with pytest.raises(MoecraftError, match="top_k"):
        craft_model(model, CraftConfig(num_experts=2, top_k=3))
    with pytest.raises(MoecraftError, match="out of range"):
        craft_model(model, CraftConfig(layers=[5]))
    with pytest.raises(MoecraftError, match="model_type"):
        craft_model(tiny_model("mixtral"), CraftConfig())


def _train(model, cfg, steps=3):
    method = get_method("pesc")
    model = method.prepare(model, cfg)
    model.train()
    opt = torch.optim.AdamW(method.param_groups(model, 0.01), lr=1e-2)
    for step in range(steps):
        ids = _ids(step)
        out = model(ids, labels=ids)
        extra = method.extra_loss(model)
        (out.loss + extra.loss).backward()
        opt.step()
        opt.zero_grad()
    return model.eval(), extra


@pytest.mark.parametrize("kind,expert", [("llama", "adapter"), ("mistral", "lora"), ("qwen2", "adapter")])
def test_training_changes_only_trainable_tensors_and_round_trips(kind, expert, tmp_path):
    cfg = CraftConfig(expert=expert, num_experts=4, top_k=2, adapter_dim=4, lora_rank=4, lora_dropout=0.0,
                      layers=[1], aux_loss_coef=0.01)
    model = tiny_model(kind)
    craft_model(model, cfg)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model, extra = _train(model, cfg)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".router." in n or ".experts." in n or ".lora_" in n for n in trainable)
    assert any(".lora_A." in n for n in trainable) and any(".router." in n for n in trainable)
    for n, p in model.named_parameters():
        if n in trainable:
            assert not torch.equal(p, before[n]), f"{n} did not train"
        else:
            assert torch.equal(p, before[n]), f"frozen {n} changed"
    assert 1.0 <= extra.logs["aux_loss"] <= 4.0  # E * sum f P lies in [1, E]
    assert sum(extra.logs[f"usage/l1/e{j}"] for j in range(4)) == pytest.approx(1.0)

    get_method("pesc").save(model, tmp_path / "art", cfg)
    saved = load_file(str(tmp_path / "art" / WEIGHTS))
    assert set(saved) == trainable  # only routers, experts and LoRA are saved
    assert (tmp_path / "art" / "run_info.json").is_file()
    loaded = get_method("pesc").load(tiny_model(kind), tmp_path / "art").eval()
    ids = _ids(9)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_load_onto_wrong_base_fails(tmp_path):
    model = craft_model(tiny_model("llama"), CraftConfig(num_experts=2, top_k=1, adapter_dim=4))
    save_artifact(model, tmp_path)
    with pytest.raises(MoecraftError, match="wrong base model .family mismatch"):
        load_artifact(tiny_model("qwen2"), tmp_path)
    with pytest.raises(MoecraftError, match="wrong base model .weights mismatch"):  # same config, other weights
        load_artifact(tiny_model("llama", seed=1), tmp_path)


def test_cli_craft_then_generate_matches_python(tmp_path, capsys):
    out = tmp_path / "art"
    assert main(["craft", "--model", "tiny:mistral", "--output", str(out), "--num-experts", "4",
                 "--adapter-dim", "4", "--layers", "0"]) == 0
    capsys.readouterr()
    assert main(["generate", "--model", "tiny:mistral", "--artifact", str(out), "--prompt", "hi",
                 "--max-new-tokens", "6"]) == 0
    text = capsys.readouterr().out
    model = load_artifact(tiny_model("mistral"), out)
    assert text == generate(model, byte_tokenizer(), "hi", max_new_tokens=6) + "\n"
    assert [i for i, _ in pesc_layers(model)] == [0]


def test_qlora_request_without_cuda_is_a_clear_error_or_skip():
    from moecraft.pesc.craft import load_base, qlora_available

    if qlora_available():
        pytest.skip("CUDA + bitsandbytes present: the NF4 path is exercised on GPU machines")
    with pytest.raises(MoecraftError, match="bitsandbytes"):
        load_base(CraftConfig(model="tiny:llama", quantize="nf4"))
    model, _ = load_base(CraftConfig(model="tiny:llama", quantize="auto"))  # falls back to full precision
    assert model.dtype == torch.float32


def test_train_config_options_reach_crafting():
    from types import SimpleNamespace

    from moecraft.methods.pesc import craft_config_from

    cfg = craft_config_from(SimpleNamespace(model="tiny:qwen2", seed=3, pesc_num_experts=6, pesc_expert="lora"))
    assert (cfg.model, cfg.seed, cfg.num_experts, cfg.expert, cfg.top_k) == ("tiny:qwen2", 3, 6, "lora", 2)
    model = get_method("pesc").prepare(tiny_model("qwen2"), SimpleNamespace(pesc={"num_experts": 3, "top_k": 1}))
    assert {m.num_experts for _, m in pesc_layers(model)} == {3}


def test_generic_artifact_loader_reads_craft_outputs_and_names_missing_folders(tmp_path):
    from moecraft import artifacts

    model = craft_model(tiny_model("llama"), CraftConfig(num_experts=2, top_k=1, adapter_dim=4))
    save_artifact(model, tmp_path / "art")
    loaded = artifacts.load_artifact(tiny_model("llama"), tmp_path / "art").eval()
    ids = _ids(7)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model.eval()(ids).logits)
    with pytest.raises(MoecraftError, match="artifact folder not found: .*nowhere"):
        artifacts.load_artifact(tiny_model("llama"), tmp_path / "nowhere")


def _crafted64(expert="adapter", seed=0):
    """A crafted tiny Llama in float64 with non-zero experts, so every token's route matters."""
    model = tiny_model("llama").double()
    craft_model(model, CraftConfig(expert=expert, num_experts=4, top_k=2, adapter_dim=4, seed=seed))
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".experts." in n:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.2)
    return model.eval()


def _ffn_inputs(model):
    """Forward pre-hooks that record each PESC layer's input hidden states."""
    seen, handles = {}, []
    for i, layer in pesc_layers(model):
        handles.append(layer.register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__(i, a[0].detach())))
    return seen, handles


@pytest.mark.parametrize("expert", ["adapter", "lora"])
def test_aux_loss_of_padded_batch_equals_unpadded_and_hand_computation(expert):
    from moecraft.pesc import aux_loss, expert_usage

    model = _crafted64(expert)
    real = _ids(4)[:1, :7]  # one sequence of 7 real tokens
    pad = torch.full((1, 3), 2)
    ones = torch.ones(1, 7, dtype=torch.long)
    with torch.no_grad():
        model(real, attention_mask=ones)
        want, want_usage = aux_loss(model), expert_usage(model)
        for ids, mask in [(torch.cat([real, pad], 1), torch.cat([ones, torch.zeros(1, 3, dtype=torch.long)], 1)),
                          (torch.cat([pad, real], 1), torch.cat([torch.zeros(1, 3, dtype=torch.long), ones], 1))]:
            model(ids, attention_mask=mask)  # right, then left padding
            torch.testing.assert_close(aux_loss(model), want, rtol=1e-9, atol=1e-12)
            for i, u in expert_usage(model).items():
                assert u == pytest.approx(want_usage[i], abs=1e-12)

    # a two-row batch: against float64 plain PyTorch on each layer's real tokens only
    ids = _ids(5)[:, :9]
    mask = torch.tensor([[1] * 9, [1] * 4 + [0] * 5])
    seen, handles = _ffn_inputs(model)
    with torch.no_grad():
        model(ids, attention_mask=mask)
    for h in handles:
        h.remove()
    want, with_padding = [], []
    for i, layer in pesc_layers(model):
        for rows, out in ((seen[i][mask.bool()], want), (seen[i].reshape(-1, 64), with_padding)):
            logits = rows @ layer.router.weight.T
            probs = torch.softmax(logits, -1)
            top = torch.topk(logits, 2).indices
            f = torch.tensor([(top == e).sum().item() / (rows.shape[0] * 2) for e in range(4)], dtype=torch.float64)
            out.append(4 * (f * probs.mean(0)).sum())
    torch.testing.assert_close(aux_loss(model), torch.stack(want).mean(), rtol=1e-12, atol=1e-12)
    assert abs(torch.stack(with_padding).mean().item() - aux_loss(model).item()) > 1e-4


def test_aux_loss_under_gradient_checkpointing_and_interleaved_forwards():
    from moecraft.pesc import aux_loss

    ids, mask = _ids(6)[:, :8], torch.tensor([[1] * 8, [1] * 5 + [0] * 3])
    grads = []
    for checkpointing in (False, True):
        model = _crafted64()
        mark_trainable(model)
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        out = model(ids, attention_mask=mask, labels=ids)
        loss = aux_loss(model)
        # another forward (another batch shape) before the backward: the first loss keeps its own mask
        model(_ids(7)[:1, :5], attention_mask=torch.ones(1, 5, dtype=torch.long))
        (out.loss + loss).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        assert any(".router." in n for n in grads[-1])
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-10, atol=1e-12)


def test_generation_with_padded_prompts_masks_each_step():
    model = _crafted64()
    ids = torch.cat([torch.full((1, 2), 2), _ids(8)[:1, :4]], 1).repeat(2, 1)
    ids[1] = _ids(9)[0, :6]
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1] * 6])  # left-padded first prompt
    out = model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=2)
    assert out.shape == (2, 9)
    for _, layer in pesc_layers(model):  # the last step routed one new token per row, both real
        assert layer.token_mask.tolist() == [[1], [1]]
        assert layer.last_usage.sum().item() == pytest.approx(1.0)


def test_defaults_are_the_official_training_lora_r64_on_every_base_linear(tmp_path):
    """`--method pesc` with no options: adapters + routers + LoRA r=64 (alpha 16, dropout 0.1) on
    q,k,v,o,gate,up,down of the base (the official PESC script, train_moe.py); the lora expert kind leaves the
    FFN projections to its experts."""
    from types import SimpleNamespace

    from peft.tuners.lora import LoraLayer

    model = get_method("pesc").prepare(tiny_model("llama"), SimpleNamespace(model="tiny:llama", seed=0))
    lora = {n.rsplit(".", 1)[-1]: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    assert set(lora) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    n_lora = sum(isinstance(m, LoraLayer) for m in model.modules())
    assert n_lora == 2 * 7  # every decoder layer, the shared FFN of the crafted layer included
    m = lora["q_proj"]
    assert m.r["default"] == 64 and m.lora_alpha["default"] == 16 and m.scaling["default"] == 16 / 64
    assert m.lora_dropout["default"].p == pytest.approx(0.1)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    for part in (".router.", ".experts.", ".lora_A.", ".lora_B."):
        assert any(part in n for n in trainable), part
    assert all(".router." in n or ".experts." in n or ".lora_" in n for n in trainable)

    cfg = CraftConfig(expert="lora", num_experts=2, top_k=1, adapter_dim=4)
    crafted = craft_model(tiny_model("llama"), cfg)
    names = {n.rsplit(".", 1)[-1] for n, m in crafted.named_modules() if isinstance(m, LoraLayer)}
    assert names == {"q_proj", "k_proj", "v_proj", "o_proj"}
    with pytest.raises(MoecraftError, match="already adapts the FFN"):
        craft_model(tiny_model("llama"), CraftConfig(expert="lora", lora_targets=["q_proj", "up_proj"]))


def test_pesc_help_names_the_source_of_each_default(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for option, source in [("--pesc-lora-rank", "default 64, official PESC script"),
                           ("--pesc-lora-alpha", "default 16, official script"),
                           ("--pesc-lora-dropout", "default 0.1, official script"),
                           ("--pesc-num-experts", "default 8: paper, official script"),
                           ("--pesc-adapter-dim", "default 512: paper"),
                           ("--pesc-quantize", "QLoRA 4-bit NF4 base (official script")]:
        assert source in text.split(option + " ", 2)[-1][:400], option
