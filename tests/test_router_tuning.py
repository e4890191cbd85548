"""Router tuning: the ``router`` method trains the MoE routers alone; ESFT ``--train-router`` adds the routers
of the layers with selected experts. Nothing else moves; artifacts load and merge back exactly."""

import json

import torch
from transformers import AutoModelForCausalLM

from moecraft.artifacts import load_artifact, read_tensors
from moecraft.commands.merge import MergeConfig, merge
from moecraft.esft.sparse import remove_sparse_experts
from moecraft.esft.stats import ScoreConfig, score_experts
from moecraft.families import moe_layers
from moecraft.models import tiny_model
from moecraft.train import TrainConfig, train

IDS = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(9))


def changed(model, base) -> set[str]:
    ref = dict(base.named_parameters())
    return {n for n, p in model.named_parameters() if not torch.equal(p.detach(), ref[n].detach())}


def test_router_method_trains_routers_only_and_merges_back(tmp_path):
    s = train(TrainConfig(model="tiny:deepseek_v2", data="builtin:intent", out=str(tmp_path / "run"), method="router",
                          seq_len=256, max_steps=2, eval_sequences=1, lr=1e-2, progress=False))
    base = tiny_model("deepseek_v2")
    routers = {f"{layer.block_path}.gate.weight" for layer in moe_layers(base)}
    assert changed(s["model"], base) == routers
    assert s["optimizer_parameters"] == sum(layer.router.weight.numel() for layer in moe_layers(base))
    tensors, _ = read_tensors(tmp_path / "run" / "trained.safetensors")
    assert set(tensors) == routers
    with torch.no_grad():
        want = s["model"].eval()(IDS).logits
        assert torch.equal(load_artifact(tiny_model("deepseek_v2"), tmp_path / "run").eval()(IDS).logits, want)
    merge(MergeConfig(artifact=str(tmp_path / "run"), out=str(tmp_path / "merged")))
    with torch.no_grad():
        assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()(IDS).logits, want)
    # stage two of the recipe: score the router-tuned model to choose experts
    scores = score_experts(ScoreConfig(model=str(tmp_path / "merged"), data="builtin:intent", n_sequences=2,
                                       seq_len=128, out=tmp_path / "scores.json"))
    assert (tmp_path / "scores.json").is_file() and scores


def test_esft_train_router_moves_the_routers_of_selected_layers_only(tmp_path):
    ec = tmp_path / "ec.json"
    ec.write_text(json.dumps({"family": "deepseek_v2", "experts": {"1": [3, 7]}}))  # layer 2 has no picks
    s = train(TrainConfig(model="tiny:deepseek_v2", data="builtin:intent", out=str(tmp_path / "run"), experts=str(ec),
                          train_router=True, seq_len=256, max_steps=2, eval_sequences=1, lr=1e-2, progress=False))
    model = remove_sparse_experts(s["model"])
    base = tiny_model("deepseek_v2")
    moved = changed(model, base)
    assert moved == {"model.layers.1.mlp.gate.weight", "model.layers.1.mlp.experts.gate_up_proj",
                     "model.layers.1.mlp.experts.down_proj"}
    for name in ("gate_up_proj", "down_proj"):  # within the fused tensor, only the selected rows
        diff = (getattr(model.model.layers[1].mlp.experts, name) - getattr(base.model.layers[1].mlp.experts, name))
        assert diff.flatten(1).abs().amax(1).nonzero().flatten().tolist() == [3, 7]
    assert s["optimizer_parameters"] == base.model.layers[1].mlp.gate.weight.numel() + 2 * (64 * 64 + 64 * 32)
    with torch.no_grad():
        want = model.eval()(IDS).logits
        got = load_artifact(tiny_model("deepseek_v2"), tmp_path / "run").eval()(IDS).logits
    assert torch.equal(got, want)
