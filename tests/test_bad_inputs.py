"""Bad input, everywhere: every row of docs/errors.md, through the CLI.

Each test gives ``moecraft.cli.main`` one bad input and checks the contract of docs/errors.md: exit code 2,
no traceback, exactly one ``moecraft <command>: error: ...`` line naming what is wrong and where, and that
the failed command wrote or changed no output.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from moecraft import compat
from moecraft.cli import main
from moecraft.errors import MoecraftError
from moecraft.esft.stats import ExpertScores
from moecraft.families import supported_families
from moecraft.methods import get_method
from moecraft.models import byte_tokenizer, check_sequence_length, tiny_config, tiny_model

FAMILIES = supported_families()


# ----------------------------------------------------------------------------- helpers
def fails(capsys, *argv) -> str:
    """Run the CLI, assert the error contract (exit 2, one clear line, no traceback); return the message."""
    rc = main([str(a) for a in argv])
    captured = capsys.readouterr()
    assert rc == 2, f"exit code {rc}; stderr: {captured.err[-500:]}"
    assert "Traceback" not in captured.err
    prefix = f"moecraft {argv[0]}: error: "
    lines = [line for line in captured.err.splitlines() if line.startswith("moecraft ")]
    assert len(lines) == 1 and lines[0].startswith(prefix), captured.err[-500:]
    return lines[0][len(prefix):]


def files_under(path: Path) -> list[str]:
    """Every file below ``path`` (empty when it does not exist)."""
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()) if path.exists() else []


def save_tiny(path: Path, kind: str, seed: int = 0, **config_overrides) -> Path:
    """A tiny random model (with tokenizer) saved as a local model folder."""
    tok = byte_tokenizer()
    if config_overrides:
        from transformers import AutoModelForCausalLM

        config = tiny_config(kind, vocab_size=len(tok))
        for key, value in config_overrides.items():
            setattr(config, key, value)
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    else:
        model = tiny_model(kind, seed=seed, tokenizer=tok)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


SCORE = ["score", "--model", "tiny:mixtral", "--n-sequences", "1", "--seq-len", "32"]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("llama") / "llama", "llama")


@pytest.fixture
def scores_file(tmp_path) -> Path:
    counts = torch.tensor([[5.0, 3.0, 1.0, 1.0], [2.0, 2.0, 4.0, 2.0]])
    scores = ExpertScores(model="m", family="mixtral", layers=[0, 1], num_experts=4, top_k=1, n_tokens=10,
                          gate_sum=counts * 0.5, token_count=counts)
    return scores.save(tmp_path / "scores.json")


# ----------------------------------------------------------------------------- 1. unknown model family
def test_dense_transformers_model_given_to_score_names_the_families(capsys, tmp_path, llama_dir):
    out = tmp_path / "scores.json"
    msg = fails(capsys, "score", "--model", llama_dir, "--out", out)
    assert "model type 'llama' is not a supported MoE family" in msg
    assert all(f in msg for f in FAMILIES) and "PESC" in msg
    assert not out.exists()


def test_dense_model_given_to_esft_training_names_the_families(capsys, tmp_path):
    experts = tmp_path / "experts.json"
    experts.write_text(json.dumps({"experts": {"1": [0]}}))
    out = tmp_path / "run"
    msg = fails(capsys, "train", "--method", "esft", "--model", "tiny:llama", "--experts", experts,
                "--data", "builtin:intent", "--out", out, "--seq-len", "128", "--max-steps", "1")
    assert "not a supported MoE family" in msg and all(f in msg for f in FAMILIES)
    assert not {"artifact.json", "trained.safetensors"} & set(files_under(out))


def test_unknown_tiny_kind_names_the_families(capsys, tmp_path):
    msg = fails(capsys, "score", "--model", "tiny:nope", "--out", tmp_path / "s.json")
    assert "unknown tiny model 'tiny:nope'" in msg and all(f in msg for f in FAMILIES) and "llama" in msg


def test_model_type_unknown_to_transformers_names_the_families(capsys, tmp_path):
    folder = tmp_path / "custom"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "my_moe"}')
    msg = fails(capsys, "score", "--model", folder)
    assert f"{folder}: model type 'my_moe' is not known to the installed transformers" in msg
    assert all(f in msg for f in FAMILIES)


def test_moe_model_given_to_pesc_craft_names_the_dense_types(capsys, tmp_path):
    msg = fails(capsys, "craft", "--model", "tiny:mixtral", "--output", tmp_path / "crafted")
    assert "PESC crafts dense models" in msg and "'llama'" in msg and "model_type='mixtral'" in msg
    assert not (tmp_path / "crafted").exists()


# ----------------------------------------------------------------------------- 2. model that does not exist
@pytest.mark.parametrize("name", ["./no/such/model", "/no/such/model", "~/no-such-model", "a/b/c"])
def test_missing_local_model_folder(capsys, name):
    assert fails(capsys, "score", "--model", name) == f"model folder not found: {name}"


def test_unknown_hub_id_offline(capsys):
    msg = fails(capsys, "score", "--model", "nobody-xyz/no-such-model")
    assert msg.startswith("could not load model 'nobody-xyz/no-such-model': not a local model folder, and the hub")
    assert "tiny:<family>" in msg


def test_folder_that_is_not_a_model(capsys, tmp_path, llama_dir):
    assert fails(capsys, "score", "--model", tmp_path) == f"{tmp_path} is not a model folder (no config.json)"
    config = llama_dir / "config.json"
    assert fails(capsys, "score", "--model", config) == f"{config} is a file, not a model folder"
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{oops")
    assert fails(capsys, "score", "--model", broken).startswith(f"{broken / 'config.json'}: not a valid JSON object")


def test_model_folder_without_weights_or_tokenizer(capsys, tmp_path, llama_dir):
    no_weights = tmp_path / "no_weights"
    shutil.copytree(llama_dir, no_weights, ignore=shutil.ignore_patterns("*.safetensors"))
    assert fails(capsys, "score", "--model", no_weights).startswith(f"{no_weights}: could not load the model weights")
    no_tok = tmp_path / "no_tokenizer"
    shutil.copytree(llama_dir, no_tok, ignore=shutil.ignore_patterns("tokenizer*", "chat_template*"))
    assert fails(capsys, "score", "--model", no_tok).startswith(f"{no_tok}: could not load the tokenizer")


def test_custom_code_checkpoint_without_trust_remote_code(capsys, tmp_path):
    assert main(["craft", "--model", "tiny:llama", "--num-experts", "2", "--adapter-dim", "4",
                 "--output", str(tmp_path / "crafted")]) == 0
    assert main(["export", "--artifact", str(tmp_path / "crafted"), "--output", str(tmp_path / "exported"),
                 "--format", "custom"]) == 0
    capsys.readouterr()
    msg = fails(capsys, "generate", "--model", tmp_path / "exported", "--prompt", "hi", "--max-new-tokens", "2")
    assert msg == f"{tmp_path / 'exported'} needs custom code: add --trust-remote-code"
    assert fails(capsys, "score", "--model", tmp_path / "exported").startswith(
        f"{tmp_path / 'exported'} needs custom code (model type 'pesc_llama', auto_map in config.json)")


# ----------------------------------------------------------------------------- 3. malformed JSONL
@pytest.mark.parametrize("lines, line_no, message", [
    (['{"text": "a"}', '{"text": "b"}', '{"text": "c"'], 3, "not valid JSON (Expecting"),
    (['{"text": "a"}', '[1, 2]'], 2, "expected a JSON object, got list"),
    (['"just a string"'], 1, "expected a JSON object, got str"),
    (['{"text": "a"}', '{"question": "q", "answer": "a"}'], 2,
     "unrecognised record with fields ['answer', 'question']; expected 'messages', 'prompt'+'response'"),
    (['{"prompt": "p"}'], 1, "unrecognised record with fields ['prompt']"),
    (['{"messages": [{"role": "bot", "content": "hi"}]}'], 1, "messages[0] must be {'role': one of"),
    (['{"messages": []}'], 1, "'messages' must be a non-empty list"),
    (['{"prompt": "p", "response": 4}'], 1, "'prompt' and 'response' must be strings"),
    (['{"text": ""}'], 1, "'text' must be a non-empty string"),
])
def test_malformed_jsonl_names_file_and_line(capsys, tmp_path, lines, line_no, message):
    data = write_lines(tmp_path / "data.jsonl", lines)
    out = tmp_path / "scores.json"
    msg = fails(capsys, *SCORE, "--data", data, "--out", out)
    assert msg.startswith(f"{data}:{line_no}: ") and message in msg
    assert not out.exists()


def test_non_utf8_line_names_file_and_line(capsys, tmp_path):
    data = tmp_path / "latin1.jsonl"
    data.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    assert fails(capsys, *SCORE, "--data", data).startswith(f"{data}:2: not UTF-8 text")


def test_malformed_jsonl_in_training_and_eval_data(capsys, tmp_path):
    data = write_lines(tmp_path / "train.jsonl", ['{"text": "a"}', "{bad"])
    msg = fails(capsys, "train", "--method", "fft", "--model", "tiny:qwen3_moe", "--data", data,
                "--out", tmp_path / "run", "--seq-len", "32", "--max-steps", "1")
    assert msg.startswith(f"{data}:2: not valid JSON")
    assert fails(capsys, "eval", "--model", "tiny:qwen3_moe", "--tasks", data,
                 "--out", tmp_path / "ev").startswith(f"{data}:2: not valid JSON")


def test_extra_fields_are_ignored_and_bom_is_accepted(capsys, tmp_path):
    data = tmp_path / "extra.jsonl"
    data.write_bytes("\ufeff".encode() + b'{"text": "hello there", "id": 3, "source": "x"}\n'
                     b'{"prompt": "p", "response": "r", "meta": {"k": 1}}\n')
    out = tmp_path / "scores.json"
    assert main([*SCORE, "--data", str(data), "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out and json.loads(out.read_text())["n_tokens"] > 0


# ----------------------------------------------------------------------------- 4. empty or missing data
@pytest.mark.parametrize("content", ["", "\n  \n\n"])
def test_empty_data_file(capsys, tmp_path, content):
    data = tmp_path / "empty.jsonl"
    data.write_text(content)
    assert fails(capsys, *SCORE, "--data", data) == f"{data}: empty file (no JSON lines)"


def test_missing_data_file(capsys, tmp_path):
    data = tmp_path / "nope.jsonl"
    assert fails(capsys, *SCORE, "--data", data) == f"data file not found: {data}"
    assert fails(capsys, *SCORE, "--data", "builtin:nope") .startswith("unknown built-in task 'nope'")


def test_missing_eval_task_fails_before_any_generation(capsys, tmp_path):
    out = tmp_path / "ev"
    missing = tmp_path / "nope.jsonl"
    msg = fails(capsys, "eval", "--model", "tiny:qwen3_moe", "--tasks", f"builtin:intent:eval,{missing}",
                "--limit", "1", "--max-new-tokens", "2", "--out", out)
    assert msg == f"eval data file not found: {missing}"
    assert files_under(out) == []  # the first task's predictions were not written either


def test_missing_mix_data(capsys, tmp_path):
    missing = tmp_path / "mix.jsonl"
    msg = fails(capsys, "train", "--method", "fft", "--model", "tiny:qwen3_moe", "--data", "builtin:arithmetic",
                "--mix-data", missing, "--out", tmp_path / "run", "--seq-len", "128", "--max-steps", "1",
                "--eval-sequences", "1", "--progress", "false")  # one step: no sequence is mixed in, still checked
    assert msg == f"data file not found: {missing}"
    assert not (tmp_path / "run").exists()  # nothing written, not even the --out folder


# ----------------------------------------------------------------------------- 5. sequences over the model's length
def test_check_sequence_length():
    model = tiny_model("mixtral")
    check_sequence_length(model, 4096)  # exactly the limit is fine
    with pytest.raises(MoecraftError, match=r"seq_len 4097 is longer than the model's max_position_embeddings 4096"):
        check_sequence_length(model, 4097)
    check_sequence_length(SimpleNamespace(config=SimpleNamespace()), 10**6)  # no limit in the config: no check


def test_score_seq_len_over_max_positions(capsys, tmp_path):
    out = tmp_path / "scores.json"
    msg = fails(capsys, "score", "--model", "tiny:mixtral", "--seq-len", "5000", "--out", out)
    assert "seq_len 5000" in msg and "max_position_embeddings 4096" in msg and "--seq-len 4096" in msg
    assert not out.exists()


@pytest.fixture(scope="module")
def short_model(tmp_path_factory) -> Path:
    """tiny:qwen3_moe saved with max_position_embeddings = 64."""
    return save_tiny(tmp_path_factory.mktemp("short") / "short", "qwen3_moe", max_position_embeddings=64)


def test_train_seq_len_over_max_positions(capsys, tmp_path, short_model):
    out = tmp_path / "run"
    msg = fails(capsys, "train", "--method", "fft", "--model", short_model, "--data", "builtin:arithmetic",
                "--out", out, "--seq-len", "128", "--max-steps", "1", "--eval-sequences", "1", "--progress", "false")
    assert "seq_len 128" in msg and "max_position_embeddings 64" in msg
    assert not {"artifact.json", "trained.safetensors"} & set(files_under(out))


def test_eval_perplexity_seq_len_over_max_positions(capsys, tmp_path, short_model):
    out = tmp_path / "ev"
    msg = fails(capsys, "eval", "--model", short_model, "--tasks", "builtin:arithmetic:eval", "--limit", "1",
                "--perplexity-data", "builtin:arithmetic:eval", "--seq-len", "128", "--out", out)
    assert "seq_len 128" in msg and "max_position_embeddings 64" in msg
    assert files_under(out) == []


# ----------------------------------------------------------------------------- 6. selection threshold and cap
@pytest.mark.parametrize("p", ["0", "-0.5", "1.5", "nan", "inf"])
def test_p_out_of_range(capsys, tmp_path, scores_file, p):
    out = tmp_path / "experts.json"
    out.write_text("previous result\n")
    msg = fails(capsys, "select", "--scores", scores_file, "--p", p, "--out", out, "--overwrite")
    rule = "must be in (0, 1]" if p in ("0", "-0.5", "1.5") else "must be a finite number"
    assert msg == f"command line: option 'p' {rule}, got {float(p)!r}"
    assert out.read_text() == "previous result\n"  # nothing lost


def test_p_not_a_number(capsys, scores_file):
    assert fails(capsys, "select", "--scores", scores_file, "--p", "abc") == \
        "command line: option 'p' expects float, got 'abc'"


@pytest.mark.parametrize("cap", ["0", "-2"])
def test_max_experts_below_one(capsys, tmp_path, scores_file, cap):
    out = tmp_path / "experts.json"
    assert fails(capsys, "select", "--scores", scores_file, "--max-experts", cap, "--out", out) == \
        f"command line: option 'max_experts' must be >= 1, got {cap}"
    assert not out.exists()


def test_bad_scores_file(capsys, tmp_path, scores_file):
    assert fails(capsys, "select", "--scores", tmp_path / "none.json") == \
        f"scores file not found: {tmp_path / 'none.json'}"
    other = tmp_path / "other.json"
    other.write_text('{"experts": {}}')
    assert "not a moecraft scores file" in fails(capsys, "select", "--scores", other)
    damaged = json.loads(scores_file.read_text())
    del damaged["top_k"]
    other.write_text(json.dumps(damaged))
    assert fails(capsys, "select", "--scores", other) == f"{other}: damaged scores file (no 'top_k')"


# ----------------------------------------------------------------------------- 7. expert ids in an expert config
TRAIN_ESFT = ["train", "--method", "esft", "--model", "tiny:deepseek_v2", "--data", "builtin:intent",
              "--seq-len", "128", "--max-steps", "1", "--eval-sequences", "1", "--progress", "false"]


@pytest.mark.parametrize("config, message", [
    ({"experts": {"1": [3, 16]}},
     "layer 1: expert ids [16] out of range: the model has 16 routed experts per layer (ids 0..15)"),
    ({"num_experts": 16, "experts": {"2": [16]}}, "layer 2: expert ids [16] out of range [0, 16)"),
    ({"experts": {"2": [0, -1]}}, "layer 2: expert ids [-1] out of range"),
    ({"experts": {"1": [2, 5, 2]}}, "layer 1: repeated expert ids [2, 5, 2]"),
    ({"experts": {"0": [2]}}, "layers [0] are not MoE layers of this model ([1, 2])"),
    ({"experts": {"1": [2], "9": [2]}}, "layers [9] are not MoE layers of this model ([1, 2])"),
    ({"experts": {"-1": [2]}}, "layer index '-1' is not a non-negative integer"),
    ({"experts": {"1": ["a", 2.5, True]}}, "layer 1: expert ids must be integers, got ['a', 2.5, True]"),
    ({"experts": {"1": 3}}, "layer 1: expected a list of expert ids, got 3"),
    ({"experts": [1, 2]}, "not an expert config (no 'experts' mapping"),
    ({"num_experts": "many", "experts": {"1": [2]}}, "'num_experts' must be a non-negative integer, got 'many'"),
    ({"num_experts": 8, "experts": {"1": [2]}}, "written for 8 experts per layer, the model has 16"),
    ({"family": "mixtral", "experts": {"1": [2]}}, "written for family 'mixtral', the model is 'deepseek_v2'"),
    ({"experts": {"1": [], "2": []}}, "selects no experts at all; nothing to train"),
])
def test_bad_expert_config_fails_before_training(capsys, tmp_path, config, message):
    experts = tmp_path / "experts.json"
    experts.write_text(json.dumps(config))
    out = tmp_path / "run"
    msg = fails(capsys, *TRAIN_ESFT, "--experts", experts, "--out", out)
    assert msg.startswith(f"{experts}: ") and message in msg
    assert not {"artifact.json", "trained.safetensors", "metrics.jsonl"} & set(files_under(out))
    assert not (out / "checkpoint").exists()


def test_missing_or_unreadable_expert_config(capsys, tmp_path):
    missing = tmp_path / "none.json"
    assert fails(capsys, *TRAIN_ESFT, "--experts", missing, "--out", tmp_path / "r1") == \
        f"expert config not found: {missing}"
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert fails(capsys, *TRAIN_ESFT, "--experts", bad, "--out", tmp_path / "r2").startswith(
        f"{bad}: not a valid JSON expert config")
    assert "--method esft needs --experts" in fails(capsys, *TRAIN_ESFT, "--out", tmp_path / "r3")


# ----------------------------------------------------------------------------- 8. artifact for another base
def test_artifact_on_another_family(capsys, tmp_path, esft_run):
    out = tmp_path / "merged"
    for argv in (["merge", "--artifact", esft_run, "--base", "tiny:qwen3_moe", "--out", out],
                 ["generate", "--model", "tiny:qwen3_moe", "--artifact", esft_run, "--prompt", "hi"],
                 ["eval", "--model", "tiny:qwen3_moe", "--adapter", esft_run, "--out", out]):
        msg = fails(capsys, *argv)
        assert msg == (f"{esft_run}: wrong base model (family mismatch: artifact was trained on 'deepseek_v2', "
                       "this base has 'qwen3_moe'; artifact base: tiny:deepseek_v2)")
    assert not out.exists()


@pytest.fixture(scope="module")
def narrow_base(tmp_path_factory) -> Path:
    """tiny:deepseek_v2 with narrower experts (moe_intermediate_size 16 instead of 32)."""
    return save_tiny(tmp_path_factory.mktemp("narrow") / "narrow", "deepseek_v2", moe_intermediate_size=16)


def test_artifact_on_a_base_of_another_shape(capsys, tmp_path, esft_run, narrow_base):
    out = tmp_path / "merged"
    msg = fails(capsys, "merge", "--artifact", esft_run, "--base", narrow_base, "--out", out)
    assert "wrong base model (config mismatch" in msg and "moe_intermediate_size: 32 vs 16" in msg
    # an artifact without a fingerprint still fails at the tensor shapes, before anything is written
    blind = tmp_path / "blind"
    shutil.copytree(esft_run, blind)
    manifest = json.loads((blind / "artifact.json").read_text())
    manifest["fingerprint"] = {}
    (blind / "artifact.json").write_text(json.dumps(manifest))
    msg = fails(capsys, "merge", "--artifact", blind, "--base", narrow_base, "--out", out)
    assert "model.layers.1.mlp.experts" in msg and "does not fit the base tensor" in msg and "wrong base?" in msg
    assert not out.exists()


def test_artifact_on_same_config_other_weights(capsys, tmp_path, esft_run):
    msg = fails(capsys, "generate", "--model", "tiny:deepseek_v2", "--seed", "1", "--artifact", esft_run,
                "--prompt", "hi", "--max-new-tokens", "2")
    assert "wrong base model (weights mismatch" in msg and "artifact base: tiny:deepseek_v2" in msg
    other = save_tiny(tmp_path / "other", "deepseek_v2", seed=1)
    msg = fails(capsys, "merge", "--artifact", esft_run, "--base", other, "--out", tmp_path / "merged")
    assert "weights mismatch" in msg
    assert not (tmp_path / "merged").exists()


def test_same_base_from_a_folder_in_bf16_is_accepted(capsys, tmp_path, esft_run):
    """The fingerprint ignores where and in which dtype the base was loaded from (regression)."""
    same = save_tiny(tmp_path / "same", "deepseek_v2", seed=0)
    out = tmp_path / "merged"
    assert main(["merge", "--artifact", str(esft_run), "--base", str(same), "--dtype", "bfloat16",
                 "--out", str(out)]) == 0
    assert (out / "config.json").is_file()
    # an artifact written before the config hash ignored load-time entries still loads; its weights still count
    old = tmp_path / "old"
    shutil.copytree(esft_run, old)
    manifest = json.loads((old / "artifact.json").read_text())
    del manifest["fingerprint"]["config"]
    manifest["fingerprint"]["config_hash"] = "0123456789abcdef"
    (old / "artifact.json").write_text(json.dumps(manifest))
    assert main(["merge", "--artifact", str(old), "--base", str(same), "--out", str(tmp_path / "m2")]) == 0
    other = save_tiny(tmp_path / "other", "deepseek_v2", seed=1)
    assert "weights mismatch" in fails(capsys, "merge", "--artifact", old, "--base", other, "--out", tmp_path / "m3")


# ----------------------------------------------------------------------------- 9. missing or broken artifact folder
def test_missing_artifact_folder(capsys, tmp_path):
    missing = tmp_path / "no_run"
    expected = f"artifact folder not found: {missing}"
    assert fails(capsys, "merge", "--artifact", missing, "--out", tmp_path / "m") == expected
    assert fails(capsys, "generate", "--model", "tiny:deepseek_v2", "--artifact", missing, "--prompt", "x") == expected
    assert fails(capsys, "eval", "--model", "tiny:deepseek_v2", "--adapter", missing, "--out", tmp_path / "e") == expected
    assert fails(capsys, "export", "--artifact", missing, "--output", tmp_path / "x") == expected
    assert files_under(tmp_path) == []


def test_artifact_folder_without_manifest(capsys, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    expected = f"{empty} is not a moecraft training output (no artifact.json)"
    assert fails(capsys, "merge", "--artifact", empty, "--out", tmp_path / "m") == expected
    assert fails(capsys, "generate", "--model", "tiny:deepseek_v2", "--artifact", empty, "--prompt", "x") == expected
    assert fails(capsys, "eval", "--model", "tiny:deepseek_v2", "--adapter", empty, "--out", tmp_path / "e") == expected
    (empty / "pesc_config.yaml").write_text("model: tiny:llama\n")  # a PESC craft output: point to export
    assert "use `moecraft export`" in fails(capsys, "merge", "--artifact", empty, "--out", tmp_path / "m")
    assert not (tmp_path / "m").exists() and not (tmp_path / "e").exists()


def test_damaged_artifact(capsys, tmp_path, esft_run):
    run = tmp_path / "run"
    shutil.copytree(esft_run, run)
    out = tmp_path / "merged"
    manifest = run / "artifact.json"
    text = manifest.read_text()
    manifest.write_text("{oops")
    assert fails(capsys, "merge", "--artifact", run, "--out", out).startswith(
        f"{manifest}: not a valid JSON artifact manifest")
    manifest.write_text(json.dumps({k: v for k, v in json.loads(text).items() if k != "method"}))
    assert fails(capsys, "merge", "--artifact", run, "--out", out) == \
        f"{manifest}: incomplete artifact manifest (missing or malformed: ['method'])"
    manifest.write_text(text)
    tensors = run / "trained.safetensors"
    tensors.write_bytes(b"\x00" * 16)
    assert fails(capsys, "merge", "--artifact", run, "--out", out).startswith(f"{tensors}: not a readable safetensors")
    tensors.unlink()
    assert fails(capsys, "merge", "--artifact", run, "--out", out) == f"artifact tensors not found: {tensors}"
    assert fails(capsys, "export", "--artifact", run, "--output", out) == \
        f"{run} is not a PESC artifact (no pesc_config.yaml)"
    assert not out.exists()


# ----------------------------------------------------------------------------- 10. bad YAML config
@pytest.mark.parametrize("text, message", [
    ("model: tiny:mixtral\nseqlen: 5\n", "{path}: unknown option(s) ['seqlen']; known: ["),
    ("seq_len: many\n", "{path}: option 'seq_len' expects int, got 'many'"),
    ("seq_len: 1.5\n", "{path}: option 'seq_len' expects int, got 1.5"),
    ("response_only: maybe\n", "{path}: option 'response_only' expects bool, got 'maybe'"),
    ("seq_len:\n", "{path}: option 'seq_len' may not be empty"),
    ("model: [tiny:mixtral\n", "{path}:2: not valid YAML (expected ',' or ']'"),
    ("- model\n- data\n", "{path}: expected a mapping of option names to values, got list"),
])
def test_bad_yaml_config(capsys, tmp_path, text, message):
    path = tmp_path / "score.yaml"
    path.write_text(text)
    out = tmp_path / "scores.json"
    msg = fails(capsys, "score", "--config", path, "--out", out)
    assert msg.startswith(message.format(path=path))
    assert not out.exists()


def test_bad_yaml_config_for_other_commands(capsys, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"score": "median"}))
    assert fails(capsys, "select", "--config", path) == \
        f"{path}: option 'score' must be one of ['gate', 'token'], got 'median'"
    path.write_text(yaml.safe_dump({"model": "tiny:qwen3_moe", "data": "builtin:intent", "out": "x",
                                    "max_steps": "ten"}))
    assert fails(capsys, "train", "--config", path) == f"{path}: option 'max_steps' expects int, got 'ten'"
    path.write_text(yaml.safe_dump({"model": "tiny:qwen3_moe"}))
    assert fails(capsys, "train", "--config", path) == \
        f"{path} + command line: required option(s) missing: ['data', 'out']"
    assert fails(capsys, "score", "--config", tmp_path / "none.yaml") == f"config file not found: {tmp_path / 'none.yaml'}"


def test_argparse_rejects_bad_choices_with_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["select", "--score", "median"])
    assert exc.value.code == 2 and "invalid choice: 'median'" in capsys.readouterr().err


# ----------------------------------------------------------------------------- 11. found while trying commands
def test_output_paths_of_the_wrong_kind_fail_before_any_work(capsys, tmp_path, scores_file, esft_run):
    folder = tmp_path / "a_folder"
    folder.mkdir()
    assert fails(capsys, *SCORE, "--out", folder) == f"--out {folder} is a folder; give a file path"
    assert fails(capsys, "select", "--scores", scores_file, "--out", folder) == \
        f"--out {folder} is a folder; give a file path"
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me")
    assert fails(capsys, "merge", "--artifact", esft_run, "--out", a_file) == \
        f"--out {a_file} is an existing file; give a folder path"
    assert fails(capsys, "eval", "--model", "tiny:qwen3_moe", "--out", a_file) == \
        f"--out {a_file} is an existing file; give a folder path"
    assert fails(capsys, "train", "--method", "fft", "--model", "tiny:qwen3_moe", "--data", "builtin:arithmetic",
                 "--out", a_file) == f"--out {a_file} is an existing file; give a folder path"
    assert a_file.read_text() == "keep me"


def test_unknown_metric_fails_before_generation(capsys, tmp_path):
    out = tmp_path / "ev"
    msg = fails(capsys, "eval", "--model", "tiny:qwen3_moe", "--tasks", "builtin:intent:eval", "--metrics", "f1",
                "--limit", "1", "--out", out)
    assert msg.startswith("unknown metric(s) ['f1']; choose from ['exact_match'")
    assert "needs --judge" in fails(capsys, "eval", "--model", "tiny:qwen3_moe", "--metrics", "judge",
                                    "--limit", "1", "--out", out)
    assert files_under(out) == []


def test_intent_metric_on_a_reference_without_an_intent(capsys, tmp_path):
    tasks = write_lines(tmp_path / "plain.jsonl", [json.dumps({"prompt": "2+2=", "reference": "4"})])
    for metric, says in (("intent_label", "reference names no intent: '4'"),
                         ("intent_json", "reference is not a JSON object: '4'")):
        msg = fails(capsys, "eval", "--model", "tiny:llama", "--tasks", tasks, "--metrics", metric,
                    "--max-new-tokens", "2", "--out", tmp_path / metric)
        assert msg == says


def test_code_metric_without_a_sandbox_fails_before_generation(capsys, tmp_path, monkeypatch):
    tasks = write_lines(tmp_path / "code.jsonl", [json.dumps({"prompt": "def f():\n", "test": "assert f() == 1"})])
    out = tmp_path / "ev"
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))  # no bwrap to be found
    eval_code = ["eval", "--model", "tiny:qwen3_moe", "--tasks", tasks, "--limit", "1", "--max-new-tokens", "4"]
    msg = fails(capsys, *eval_code, "--out", out)
    assert msg.startswith("code_pass@1 runs model-written code and needs a sandbox, but there is none: bwrap not found")
    assert msg.endswith("or pass --unsafe-code-exec to run it unsandboxed")
    assert files_under(out) == []
    # the explicit opt-out runs the tests on the host
    assert main([str(a) for a in [*eval_code, "--unsafe-code-exec", "--out", out]]) == 0
    assert "code_pass@1" in json.loads((out / "results.json").read_text())["tasks"][str(tasks)]["metrics"]


def test_negative_limit(capsys):
    assert fails(capsys, *SCORE, "--limit", "-1") == "command line: option 'limit' must be >= 0, got -1"


def test_sample_without_response_tokens(capsys, tmp_path):
    data = write_lines(tmp_path / "d.jsonl", [json.dumps({"prompt": "x" * 200, "response": "y"})])
    msg = fails(capsys, *SCORE, "--data", data, "--seq-len", "16", "--response-only")
    assert msg.startswith("the 1 sampled sequence(s) of 16 tokens hold no response tokens")


def test_expert_parallel_settings_checked_before_any_work(capsys, tmp_path):
    if not compat.supports("expert_parallel"):  # this transformers refuses it first, naming the versions
        with pytest.raises(MoecraftError, match=r"^moecraft needs transformers >= 5\.22 for --expert-parallel"):
            compat.expert_parallel_api()
        return
    folder = save_tiny(tmp_path / "base", "deepseek_v2")
    experts = tmp_path / "experts.json"
    experts.write_text(json.dumps({"format": "moecraft.expert_config/1", "experts": {"1": [0]}}))
    out = tmp_path / "run"
    train = ["train", "--model", folder, "--data", "builtin:intent", "--out", out, "--seq-len", "64",
             "--max-steps", "1", "--experts", experts, "--expert-parallel", "2"]
    assert fails(capsys, *train, "--method", "lora").startswith("--expert-parallel is for --method esft (got lora)")
    assert fails(capsys, *train).startswith("--expert-parallel 2 must equal the number of processes (1)")
    assert files_under(out) == []
    scores = tmp_path / "scores.json"
    assert fails(capsys, "score", "--model", folder, "--data", "builtin:intent", "--out", scores,
                 "--expert-parallel", "2").startswith("--expert-parallel 2 must equal the number of processes (1)")
    assert not scores.exists()


def test_lora_experts_with_dropout(capsys, tmp_path):
    out = tmp_path / "run"
    msg = fails(capsys, "train", "--model", "tiny:deepseek_v2", "--data", "builtin:intent", "--out", out,
                "--method", "lora", "--lora-experts", "true", "--lora-dropout", "0.1", "--seq-len", "64",
                "--max-steps", "1")
    assert msg.startswith("lora_experts needs lora_dropout 0 (got 0.1)")
    assert files_under(out) == []


# ----------------------------------------------------------------------------- 12. data formats and file types
MSGS = '{"messages": [{"role": "user", "content": %s}, {"role": "assistant", "content": "a"%s}]}'


@pytest.mark.parametrize("name, content, args, where, message", [
    ("d.jsonl", '{"instruction": "i", "input": "", "output": "o", "text": "t"}', [], ":1",
     "record mixes formats: alpaca ('instruction', 'output'), text ('text'); force one with --data-format alpaca|text"),
    ("d.jsonl", '{"text": "t"}\n{"prompt": "p", "text": "t"}', [], ":2",
     "record mixes formats: text ('text') next to 'prompt'; force one with --data-format text|prompt_completion"),
    ("d.jsonl", '{"instruction": "i"}', ["--data-format", "alpaca"], ":1",
     "alpaca record has no 'output' (fields ['instruction'])"),
    ("d.jsonl", '{"conversations": [{"from": "bot", "value": "x"}]}', [], ":1",
     "conversations[0] must be {'role': one of ['assistant', 'system', 'tool', 'user'], 'content': str}"),
    ("d.jsonl", MSGS % ('[{"type": "image_url", "image_url": {"url": "x"}}]', ""), [], ":1",
     "messages[0]: content part 0 is 'image_url', not text; only text parts can be trained"),
    ("d.jsonl", MSGS % ('"q"', ', "weight": 0.5'), [], ":1", "messages[1]: weight must be 0 or 1, got 0.5"),
    ("d.jsonl", MSGS % ('5', ""), [], ":1", "messages[0]: content must be a string or a list of text parts, got int"),
    ("d.jsonl", '{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}], "system": "t"}',
     [], ":1", "both a 'system' field and a system message"),
    ("d.jsonl", '{"instruction": "i", "output": "o", "history": [["q"]]}', [], ":1",
     "history[0] must be a [prompt, response] pair of strings"),
    ("d.jsonl", '{"instruction": ["i"], "output": "o"}', [], ":1", "'instruction' must be a string, got list"),
    ("d.jsonl", '{"text": "a"}\n{"text": "\\ud83d"}', [], ":2",
     "text holds a lone surrogate '\\ud83d' at character 0 (half of a UTF-16 pair, not a character)"),
    ("d.jsonl", '{"text": "a", "meta": ' + "[" * 150 + "]" * 150 + "}", [], ":1", "nested deeper than 100 levels"),
    ("d.jsonl", '{"text": "a", "meta": ' + "[" * 100000 + "]" * 100000 + "}", [], ":1",
     "not valid JSON (nested deeper than Python can parse)"),
    ("d.jsonl", '{"text": "a", "n": ' + "9" * 5000 + "}", [], ":1",
     "not valid JSON (a number with more than 4300 digits)"),
    ("d.json", '[\n  {"text": "a"},\n  [1]\n]', [], ":3", "expected a JSON object, got list"),
    ("d.json", '[\n  {"text": "a"}\n  {"text": "b"}\n]', [], ":3", "not valid JSON (expected ',' or ']' in the array)"),
    ("d.json", '[{"text": "a"}] {"text": "b"}', [], ":1", "not valid JSON (extra data after the array)"),
    ("d.json", "[]", [], "", "empty JSON array (no records)"),
    ("d.csv", "text,text\na,b\n", [], ":1", "repeated column name(s) ['text']"),
    ("d.csv", "text\na,b\n", [], ":2", "2 fields, the header has 1"),
    ("d.csv", "", [], "", "empty file (no header row)"),
    ("d.csv", 'messages\n"[{""role"": ""user""}"\n', [], ":2 (column 'messages')", "not valid JSON"),
    ("d.parquet", '{"text": "a"}', [], "", "not a parquet file (no parquet header)"),
    ("d.parquet", "PAR1 but not really", [], "", "not a readable parquet file ("),
    ("d.arrow", "ARROW1 but not really", [], "", "not a readable arrow file ("),
    ("d.jsonl.gz", b"\x1f\x8b\x08", [], "", "a gzip-compressed file; decompress it first"),
])
def test_bad_records_of_every_format_and_file_type(capsys, tmp_path, name, content, args, where, message):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    msg = fails(capsys, "data", "--data", path, *args)
    assert msg.startswith(f"{path}{where}: {message}"), msg


def test_folder_without_data_files(capsys, tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    assert fails(capsys, "data", "--data", tmp_path).startswith(f"{tmp_path}: no data files (.jsonl, .ndjson")


def test_bad_data_format_options(capsys, tmp_path):
    data = write_lines(tmp_path / "d.jsonl", ['{"text": "a"}'])
    assert fails(capsys, "data", "--data", data, "--roles", "bot=assistant").startswith(
        "option 'roles': 'bot' is not a role; keys are ['system', 'user', 'assistant', 'tool']")
    assert fails(capsys, "train", "--method", "fft", "--model", "tiny:qwen3_moe", "--data", data,
                 "--out", tmp_path / "run", "--roles-to-train", "gpt") == "option 'roles_to_train': unknown role(s) ['gpt']; choose from " \
                                               "['system', 'user', 'assistant', 'tool']"
    assert not (tmp_path / "run").exists()
    assert fails(capsys, "score", "--data", data, "--message-property-mappings", "from").startswith(
        "command line: option 'message_property_mappings' expects dict, got 'from'")
    assert fails(capsys, "data", "--data", data, "--examples", "-1") == "command line: option 'examples' must be >= 0, got -1"


def test_folder_with_files_of_several_splits(capsys, tmp_path):
    (tmp_path / "data").mkdir()
    for name in ("train-00000-of-00001.jsonl", "test-00000-of-00001.jsonl"):
        (tmp_path / "data" / name).write_text('{"text": "a"}\n')
    assert fails(capsys, "data", "--data", tmp_path) == \
        f"{tmp_path}: holds files of several splits (test, train); give one split's file or folder"
    assert main(["data", "--data", str(tmp_path / "data" / "train-00000-of-00001.jsonl"), "--examples", "0"]) == 0

# ----------------------------------------------------------------------------- 12. chat templates
def test_chat_template_error_fails_before_the_model_loads(capsys, tmp_path):
    # a Mixtral folder with the first Mixtral template (no system turn) and no weights: the template error
    # must come first, as one line, or the weights error would
    folder = save_tiny(tmp_path / "base", "mixtral")
    for weights in folder.glob("*.safetensors"):
        weights.unlink()
    template = Path(__file__).parent / "fixtures" / "chat_templates" / "mixtral_8x7b_instruct_v0_1_original.jinja"
    (folder / "chat_template.jinja").write_text(template.read_text(encoding="utf-8"), encoding="utf-8")
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    data = write_lines(tmp_path / "d.jsonl", [json.dumps({"messages": chat})] * 3 +
                       [json.dumps({"messages": [{"role": "system", "content": "be brief"}, *chat]})])
    rejected = ("the chat template rejects this conversation (roles: system, user, assistant): "
                "Conversation roles must alternate user/assistant/user/assistant/...")
    out = tmp_path / "run"
    msg = fails(capsys, "train", "--model", folder, "--data", data, "--eval-data", data, "--out", out,
                "--method", "fft", "--seq-len", "64", "--max-steps", "1")
    assert msg == f"{data}: record 4: {rejected}"
    assert files_under(out) == []
    scores = tmp_path / "scores.json"
    msg = fails(capsys, "score", "--model", folder, "--data", data, "--out", scores, "--n-sequences", "4",
                "--seq-len", "64")
    assert msg == f"{data}: record 4: {rejected}"
    assert not scores.exists()
    # held-out eval records keep their numbers in the data file
    msg = fails(capsys, "train", "--model", folder, "--data", data, "--eval-fraction", "0.5", "--out", out,
                "--method", "fft", "--seq-len", "64", "--max-steps", "1")
    assert msg == f"{data}: record 4: {rejected}"


def test_chat_template_kwargs_not_a_json_object(capsys, tmp_path, monkeypatch):
    out = tmp_path / "run"
    msg = fails(capsys, "train", "--model", "tiny:qwen3_moe", "--data", "builtin:intent", "--out", out,
                "--method", "fft", "--max-steps", "1", "--chat-template-kwargs", "enable_thinking=false")
    assert msg == ("option 'chat_template_kwargs' expects a JSON object such as '{\"enable_thinking\": false}', "
                   "got 'enable_thinking=false'")
    assert files_under(out) == []
    assert fails(capsys, *SCORE, "--chat-template-kwargs", "[1]").startswith(
        "option 'chat_template_kwargs' expects a JSON object")
    # eval and generate render their prompts with the same options: the same line, before the model loads
    loads = []
    monkeypatch.setattr("moecraft.models.load_model", lambda *a, **k: loads.append(a) or (_ for _ in ()).throw(
        AssertionError("the model was loaded")))
    evals = tmp_path / "eval"
    assert fails(capsys, "eval", "--model", "tiny:qwen3_moe", "--out", evals, "--chat-template-kwargs",
                 "enable_thinking=false") == msg
    assert not evals.exists() and files_under(tmp_path) == []
    assert fails(capsys, "generate", "--model", "tiny:qwen3_moe", "--prompt", "hi", "--chat-template-kwargs",
                 "[1]").startswith("option 'chat_template_kwargs' expects a JSON object")
    assert loads == []

def test_library_below_the_supported_versions(capsys, tmp_path, monkeypatch):
    real = compat.version_of
    monkeypatch.setattr(compat, "version_of", lambda p: "5.10.1" if p == "transformers" else real(p))
    out = tmp_path / "scores.json"
    msg = fails(capsys, *SCORE, "--data", "builtin:intent", "--out", out)
    assert msg == (f"moecraft needs transformers >= {compat.MINIMUM['transformers']} (found 5.10.1); install the tested "
                   "versions with `pip install -c constraints.txt -e .` (README, Install)")
    assert not out.exists()
    assert main(["env"]) == 0 and "transformers" in capsys.readouterr().out  # env still reports, to show why


def test_library_too_old_for_a_feature(capsys, tmp_path, monkeypatch):
    real = compat.version_of
    # transformers 5.21: every command works but --expert-parallel (5.22's token dispatch); checked before any work
    monkeypatch.setattr(compat, "version_of", lambda p: "5.21.0" if p == "transformers" else real(p))
    folder = save_tiny(tmp_path / "base", "deepseek_v2")
    experts = tmp_path / "experts.json"
    experts.write_text(json.dumps({"format": "moecraft.expert_config/1", "experts": {"1": [0]}}))
    out = tmp_path / "run"
    msg = fails(capsys, "train", "--model", folder, "--data", "builtin:intent", "--out", out, "--seq-len", "64",
                "--max-steps", "1", "--experts", experts, "--expert-parallel", "2")
    assert msg == ("moecraft needs transformers >= 5.22 for --expert-parallel (DistributedConfig(ep_size=...) with "
                   "expert-parallel token dispatch); found transformers 5.21.0")
    assert files_under(out) == []
    # peft 0.19 (below the minimum, which the CLI refuses first): from Python, LoRA on the experts is refused
    monkeypatch.setattr(compat, "version_of", lambda p: "0.19.1" if p == "peft" else real(p))
    cfg = SimpleNamespace(lora_r=4, lora_alpha=8, lora_dropout=0.0, lora_experts=True)
    with pytest.raises(MoecraftError) as err:
        get_method("lora").prepare(tiny_model("deepseek_v2"), cfg)
    assert str(err.value) == ("moecraft needs peft >= 0.20 for LoRA on the fused routed-expert tensors "
                              "(--lora-experts); found peft 0.19.1")


def test_env_constraints_file_missing(capsys, tmp_path):
    msg = fails(capsys, "env", "--constraints", tmp_path / "nope.txt")
    assert msg == f"constraints file not found: {tmp_path / 'nope.txt'}"


def test_report_to_a_tracker_that_is_not_installed(capsys, tmp_path, monkeypatch):
    from moecraft.train import tracking

    monkeypatch.setattr(tracking, "tracker_available", lambda name: name not in ("wandb", "sqlalchemy"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    loaded = []
    monkeypatch.setattr("moecraft.train.loop.load_model", lambda *a, **k: loaded.append(a))
    out = tmp_path / "run"
    train = ["train", "--model", "tiny:deepseek_v2", "--data", "builtin:intent", "--out", out, "--method", "lora",
             "--seq-len", "64", "--max-steps", "1"]
    assert fails(capsys, *train, "--report-to", "tensorboard,wandb") == (
        "--report-to wandb needs the wandb package, which is not installed: pip install wandb "
        "(or pip install 'moecraft[track]' for all trackers)")
    assert fails(capsys, *train, "--report-to", "mlflow").startswith(
        "--report-to mlflow keeps its runs in a local SQLite file, which needs sqlalchemy")
    assert loaded == [] and files_under(out) == []
    assert fails(capsys, *train, "--report-to", "none,tensorboard") == (
        "command line: option 'report_to': 'none' cannot be combined with other trackers, got ['none', 'tensorboard']")
