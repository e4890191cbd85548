"""Artifacts: save -> load and merge -> from_pretrained reproduce the trained model; wrong base is an error."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from moecraft.artifacts import load_artifact, read_tensors
from moecraft.commands.merge import MergeConfig, merge
from moecraft.errors import MoecraftError
from moecraft.esft.sparse import remove_sparse_experts
from moecraft.models import tiny_model
from moecraft.train import TrainConfig, train

IDS = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(5))


def _logits(model):
    model.eval()
    with torch.no_grad():
        return model(IDS).logits


@pytest.fixture(scope="module")
def esft_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("esft")
    ec = tmp / "ec.json"
    ec.write_text(json.dumps({"family": "deepseek_v2", "experts": {"1": [3, 7], "2": [0, 5, 9]},
                              "train_shared_experts": True}))
    s = train(TrainConfig(model="tiny:deepseek_v2", data="builtin:intent", out=str(tmp / "run"), experts=str(ec),
                          seq_len=128, max_steps=2, eval_sequences=1, lr=1e-3, progress=False))
    return tmp / "run", _logits(remove_sparse_experts(s["model"]))


def test_esft_artifact_holds_only_selected_rows(esft_run):
    run, _ = esft_run
    tensors, rows = read_tensors(run / "trained.safetensors")
    assert rows["model.layers.1.mlp.experts.gate_up_proj"] == [3, 7]
    assert tensors["model.layers.1.mlp.experts.gate_up_proj"].shape == (2, 64, 64)
    assert tensors["model.layers.2.mlp.experts.down_proj"].shape == (3, 64, 32)
    assert any("shared_experts" in k for k in tensors)  # train_shared_experts from the expert config


def test_esft_save_load_merge_identical_logits(esft_run, tmp_path):
    run, trained = esft_run
    loaded = load_artifact(tiny_model("deepseek_v2"), run)
    assert torch.equal(_logits(loaded), trained)
    merge(MergeConfig(artifact=str(run), out=str(tmp_path / "merged")))
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert torch.equal(_logits(stock), trained)


def test_wrong_base_is_a_clear_error(esft_run):
    run, _ = esft_run
    with pytest.raises(MoecraftError, match="family mismatch"):
        load_artifact(tiny_model("qwen3_moe"), run)
    with pytest.raises(MoecraftError, match="weights mismatch"):
        load_artifact(tiny_model("deepseek_v2", seed=1), run)
    with pytest.raises(MoecraftError, match="no artifact.json"):
        load_artifact(tiny_model("deepseek_v2"), run.parent)


def test_lora_and_fft_merge(tmp_path):
    for method in ("lora", "fft"):
        s = train(TrainConfig(model="tiny:mixtral", data="builtin:intent", out=str(tmp_path / method),
                              method=method, seq_len=128, max_steps=1, eval_sequences=1, lr=1e-2, progress=False))
        trained = _logits(s["model"])
        assert not torch.equal(trained, _logits(tiny_model("mixtral")))
        merge(MergeConfig(artifact=str(tmp_path / method), out=str(tmp_path / f"{method}_merged")))
        stock = AutoModelForCausalLM.from_pretrained(tmp_path / f"{method}_merged")
        if method == "fft":
            assert torch.equal(_logits(stock), trained)
        else:  # merging W + BA changes rounding: float32 tolerance
            torch.testing.assert_close(_logits(stock), trained, rtol=1e-5, atol=1e-5)
