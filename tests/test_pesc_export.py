"""PESC export: LoRA kind -> plain Mixtral checkpoint, adapter kind -> trust_remote_code checkpoint;
both reload with AutoModelForCausalLM and give the crafted model's logits."""

import pytest
import torch
from transformers import AutoModelForCausalLM, MixtralForCausalLM

from moecraft.cli import main
from moecraft.errors import MoecraftError
from moecraft.models import tiny_model
from moecraft.pesc import CraftConfig, craft_model, export_model, load_artifact, save_artifact


def _trained(kind, expert, layers=None, lora_rank=0, seed=0):
    """A crafted model with random (non-zero) experts/routers, as if trained."""
    model = tiny_model(kind)
    craft_model(model, CraftConfig(expert=expert, num_experts=4, top_k=2, adapter_dim=4, layers=layers,
                                   lora_rank=lora_rank, seed=seed))
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".experts." in n or ".lora_B." in n or ".router." in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model.eval()


def _ids():
    return torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("kind,layers,lora_rank", [("llama", None, 0), ("mistral", [1], 4)])
def test_lora_kind_exports_to_plain_mixtral(kind, layers, lora_rank, tmp_path):
    model = _trained(kind, "lora", layers, lora_rank)
    with torch.no_grad():
        ref = model(_ids()).logits
    export_model(model, tmp_path)
    assert not (tmp_path / "modeling_pesc.py").exists()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()  # no custom code
    assert type(loaded) is MixtralForCausalLM
    assert loaded.model.layers[0].mlp.experts.gate_up_proj.shape == (4, 2 * 128, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(_ids()).logits, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind,expert,lora_rank", [("llama", "adapter", 0), ("qwen2", "adapter", 4),
                                                   ("qwen2", "lora", 0)])
def test_custom_export_reloads_with_auto_class(kind, expert, lora_rank, tmp_path):
    model = _trained(kind, expert, lora_rank=lora_rank)
    with torch.no_grad():
        ref = model(_ids()).logits
    export_model(model, tmp_path)  # auto: adapter kind, or a base Mixtral cannot hold -> custom code
    assert (tmp_path / "modeling_pesc.py").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True).eval()
    with torch.no_grad():
        got = loaded(_ids()).logits
    if lora_rank == 0:
        assert torch.equal(got, ref)
    else:  # base LoRA merged into the weights: equal up to rounding
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_adapter_kind_refuses_mixtral(tmp_path):
    with pytest.raises(MoecraftError, match="lora"):
        export_model(_trained("llama", "adapter"), tmp_path, fmt="mixtral")
    with pytest.raises(MoecraftError, match="Mixtral layout"):
        export_model(_trained("qwen2", "lora"), tmp_path, fmt="mixtral")


def test_cli_export_from_artifact(tmp_path, capsys):
    model = _trained("llama", "lora")
    save_artifact(model, tmp_path / "art")
    assert main(["export", "--artifact", str(tmp_path / "art"), "--output", str(tmp_path / "out")]) == 0
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    reloaded = load_artifact(tiny_model("llama"), tmp_path / "art").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(_ids()).logits, reloaded(_ids()).logits, rtol=1e-5, atol=1e-5)
    assert (tmp_path / "out" / "tokenizer.json").is_file()
    assert (tmp_path / "out" / "moecraft_run_info.json").is_file()
