"""GGUF inputs and `moecraft convert`, without real weights (fast): bad GGUF inputs give one-line errors
(docs/errors.md section 2), and convert writes a folder that loads back to the same model bit for bit.
Reading real GGUF files (SmolLM2) is tested in tests/test_real_models.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_bad_inputs import fails  # the CLI error contract: exit 2, one line, no traceback

from moecraft.cli import main
from moecraft.errors import MoecraftError, UnsupportedModelError
from moecraft.models import gguf_file, load_model


def write_gguf(path: Path, arch: str) -> Path:
    """A real (tiny) GGUF file: header, ``general.architecture`` and one tensor, written by the gguf package."""
    gguf = pytest.importorskip("gguf")
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_file_that_is_not_gguf(capsys, tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04 not a gguf file")
    assert fails(capsys, "score", "--model", fake) == f"{fake}: not a GGUF file (it starts with b'PK\\x03\\x04', not b'GGUF')"


def test_gguf_missing_file_and_folder_with_several(capsys, tmp_path):
    assert fails(capsys, "generate", "--model", "./no/such.gguf", "--prompt", "hi") == "GGUF file not found: ./no/such.gguf"
    assert fails(capsys, "craft", "--model", "such.gguf", "--output", tmp_path / "o") == "GGUF file not found: such.gguf"
    models = tmp_path / "models"
    models.mkdir()
    for name in ("a.gguf", "b.gguf"):
        (models / name).write_bytes(b"GGUF")
    msg = fails(capsys, "craft", "--model", models, "--output", tmp_path / "out")
    assert msg == f"{models} holds several GGUF files (a.gguf, b.gguf); pass one of them as --model"
    assert not (tmp_path / "out").exists()


def test_gguf_architecture_transformers_cannot_read(capsys, tmp_path):
    path = write_gguf(tmp_path / "m" / "x.gguf", "nope")
    assert gguf_file(tmp_path / "m") == path  # a folder holding one GGUF file (and no config.json) names it
    msg = fails(capsys, "convert", "--model", tmp_path / "m", "--out", tmp_path / "out")
    assert msg.startswith(f"{path}: GGUF architecture 'nope' cannot be read by the installed transformers ")
    assert not (tmp_path / "out").exists()
    with pytest.raises(UnsupportedModelError):
        load_model(str(path))


def test_gguf_without_the_gguf_package(capsys, tmp_path, monkeypatch):
    import importlib.util

    path = write_gguf(tmp_path / "x.gguf", "llama")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    msg = fails(capsys, "score", "--model", path)
    assert msg == f"{path}: reading GGUF files needs the gguf package: pip install 'moecraft[gguf]'"


def test_gguf_sharded_load_asks_for_a_converted_folder(tmp_path):
    path = write_gguf(tmp_path / "x.gguf", "llama")
    with pytest.raises(MoecraftError, match=r"a sharded load reads a model folder; write one with `moecraft convert"):
        load_model(str(path), distributed_config=object())


def test_convert_out_not_empty(capsys, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert fails(capsys, "convert", "--model", "tiny:llama", "--out", out) == f"--out {out} is not empty; use --overwrite to replace it"
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_convert_writes_a_plain_folder_that_loads_back_bit_exact(tmp_path, capsys):
    out = tmp_path / "conv"
    assert main(["convert", "--model", "tiny:llama", "--out", str(out)]) == 0
    assert "converted tiny:llama" in capsys.readouterr().out
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json", "run_info.json"} <= names
    a, tok_a = load_model("tiny:llama")
    b, tok_b = load_model(str(out))
    assert tok_b.chat_template == tok_a.chat_template
    ids = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)
