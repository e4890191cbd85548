"""ESFT with expert parallelism: 2 CPU processes (gloo), each owning half of every layer's experts.

transformers loads the model sharded (``DistributedConfig(ep_size=2)``) and moves tokens to their experts'
process with an all-to-all; each process trains on its own batches. The run must equal one process with
twice the gradient accumulation, its checkpoint and artifact must hold every trained expert whole (loadable
on one device), and ``--resume`` must continue it exactly.
"""

import json
from pathlib import Path

import pytest
import torch
from launchers import torchrun
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from moecraft import compat
from moecraft.artifacts import load_artifact
from moecraft.errors import MoecraftError
from moecraft.models import byte_tokenizer, tiny_model
from moecraft.train import TrainConfig, train
from moecraft.train.checkpoint import read_state

# transformers before 5.22 has no expert-parallel token dispatch: moecraft refuses --expert-parallel there, naming the
# versions (the last test), and the tests that run it cannot run
needs_ep = pytest.mark.skipif(not compat.supports("expert_parallel"),
                              reason="this transformers has no expert-parallel token dispatch (refusal tested)")

# 16 experts per layer: process 0 owns 0-7, process 1 owns 8-15, so process 1 trains no expert of layer 1
EXPERTS = {"1": [3, 7], "2": [0, 5, 9]}
TOL = dict(rtol=1e-5, atol=1e-5)  # the all-to-all sums expert outputs in another order than one process


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """tiny:deepseek_v2 saved as an ordinary folder: a sharded load reads its shard from disk."""
    folder = tmp_path_factory.mktemp("base") / "deepseek_v2"
    tiny_model("deepseek_v2").save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


def _expert_config(tmp_path: Path) -> str:
    path = tmp_path / "experts.json"
    path.write_text(json.dumps({"format": "moecraft.expert_config/1", "family": "deepseek_v2", "experts": EXPERTS}))
    return str(path)


def _assert_same(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        torch.testing.assert_close(a[name], b[name], **TOL, msg=name)


@needs_ep
def test_expert_parallel_esft_trains_like_one_process_and_resumes(tmp_path, base):
    experts = _expert_config(tmp_path)
    common = dict(model=str(base), data="builtin:intent", method="esft", experts=experts, seq_len=128, max_steps=3,
                  eval_sequences=2, lr=1e-3, save_every=2, progress=False)
    one = train(TrainConfig(out=str(tmp_path / "one"), grad_accum=2, **common))
    two = tmp_path / "two"
    cli = ["-m", "moecraft", "train", "--model", str(base), "--data", "builtin:intent", "--out", str(two),
           "--method", "esft", "--experts", experts, "--seq-len", "128", "--max-steps", "3", "--eval-sequences", "2",
           "--lr", "1e-3", "--save-every", "2", "--progress", "false", "--expert-parallel", "2"]
    torchrun(*cli)

    manifest = json.loads((two / "artifact.json").read_text())
    assert (manifest["processes"], manifest["engine"]) == (2, "EXPERT_PARALLEL")
    assert manifest["optimizer_parameters"] == one["optimizer_parameters"]  # the two halves add up
    trained = load_file(two / "trained.safetensors")
    _assert_same(trained, load_file(tmp_path / "one" / "trained.safetensors"))
    # the step-2 checkpoint holds every trained expert whole, by name, like one process's
    ck1, ck2 = tmp_path / "one" / "checkpoint", two / "checkpoint"
    _assert_same(load_file(ck2 / "trainable.safetensors"), load_file(ck1 / "trainable.safetensors"))
    states = [read_state(ck2, f"optimizer-{r}")["state"] for r in (0, 1)]
    held = sum(s["exp_avg"].numel() for state in states for s in state.values())
    assert held == one["optimizer_parameters"]  # each process keeps Adam state for its own experts only
    eval_two = [json.loads(x) for x in (two / "metrics.jsonl").read_text().splitlines()][-1]["eval_loss"]
    assert eval_two == pytest.approx(one["eval_loss"], rel=1e-5)

    # the artifact loads onto the plain base on one device (its fingerprint taken from the sharded load)
    ids = torch.arange(5, 60).unsqueeze(0)
    with torch.no_grad():
        logits = load_artifact(AutoModelForCausalLM.from_pretrained(base), two)(ids).logits
        reference = load_artifact(AutoModelForCausalLM.from_pretrained(base), tmp_path / "one")(ids).logits
    torch.testing.assert_close(logits, reference, **TOL)

    # resuming from the step-2 checkpoint on two processes redoes step 3 exactly
    torchrun(*cli, "--resume")
    for name, t in load_file(two / "trained.safetensors").items():
        assert torch.equal(t, trained[name]), name


@needs_ep
@pytest.mark.parametrize("change, message", [
    (dict(method="lora"), "--expert-parallel is for --method esft"),
    (dict(expert_parallel=0), "option 'expert_parallel' must be >= 1, got 0"),
    (dict(), "must equal the number of processes"),  # 2 asked, 1 process
])
def test_expert_parallel_bad_settings_are_refused(tmp_path, base, change, message):
    settings = dict(model=str(base), data="builtin:intent", out=str(tmp_path / "out"), experts=_expert_config(tmp_path),
                    seq_len=64, max_steps=1, expert_parallel=2, progress=False) | change
    with pytest.raises(MoecraftError, match=message):
        train(TrainConfig(**settings))
    assert not (tmp_path / "out").exists()


@needs_ep
def test_a_sharded_load_needs_a_saved_model():
    from moecraft.models import load_model

    with pytest.raises(MoecraftError, match="sharded load reads a saved model"):
        load_model("tiny:deepseek_v2", distributed_config=object())


@needs_ep
def test_shared_or_non_expert_training_is_refused_under_expert_parallelism(tmp_path, base):
    from types import SimpleNamespace

    from moecraft.families import moe_layers
    from moecraft.methods.esft import METHOD

    model = AutoModelForCausalLM.from_pretrained(base)
    model.config.distributed_config = SimpleNamespace(ep_size=2)  # what a sharded load records ...
    for layer in moe_layers(model):
        layer.experts.num_experts = 8  # ... with half of the 16 experts on this process
    cfg = SimpleNamespace(experts=_expert_config(tmp_path), train_shared_experts=True, train_non_expert_modules=None)
    with pytest.raises(MoecraftError, match="trains routed experts only"):
        METHOD.prepare(model, cfg)


@needs_ep
def test_expert_parallel_scoring_sums_every_process_share(tmp_path, base):
    """3 sequences on 2 processes: one of them also runs a batch that counts nothing, to keep the all-to-alls
    in step; the summed statistics are those of one process scoring all 3."""
    from moecraft.esft.stats import ExpertScores, ScoreConfig, score_experts

    options = ["--data", "builtin:intent", "--n-sequences", "3", "--seq-len", "64"]
    torchrun("-m", "moecraft", "score", "--model", str(base), "--out", str(tmp_path / "ep.json"),
             "--expert-parallel", "2", *options)
    one = score_experts(ScoreConfig(model=str(base), data="builtin:intent", n_sequences=3, seq_len=64,
                                    out=tmp_path / "one.json"))
    two = ExpertScores.load(tmp_path / "ep.json")
    assert two.n_tokens == one.n_tokens == 3 * 64
    assert torch.equal(two.token_count, one.token_count)  # every token picks the same experts
    torch.testing.assert_close(two.gate_sum, one.gate_sum, rtol=1e-6, atol=1e-9)


@pytest.mark.skipif(compat.supports("expert_parallel"), reason="this transformers has expert parallelism")
def test_expert_parallel_is_refused_naming_the_versions():
    from moecraft.esft.expert_parallel import expert_parallel_config

    with pytest.raises(MoecraftError) as err:
        expert_parallel_config(2, 2)
    assert str(err.value) == (f"moecraft needs transformers >= 5.22 for --expert-parallel (DistributedConfig(ep_size=...)"
                              f" with expert-parallel token dispatch); found transformers {compat.version_of('transformers')}")
