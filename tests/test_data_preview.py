"""``moecraft data``: rendered examples with the trained tokens marked, and counts checked against a byte count."""

import io
import json
import math
import re

import numpy as np
import pytest

import moecraft.data
from moecraft.cli import main
from moecraft.commands.data import DataConfig, preview
from moecraft.models import byte_tokenizer

TEXT = "héllo wörld"  # the byte tokenizer: one token per UTF-8 byte, plus <|bos|>/<|eos|> as single tokens
PAIR = {"prompt": "2+2=", "completion": "4"}
ALPACA = {"instruction": "Add", "input": "2+2", "output": "4"}
USER_ONLY = {"messages": [{"role": "user", "content": "nothing to learn"}]}


def _data(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in
                              [{"text": TEXT}, PAIR, ALPACA, USER_ONLY]) + "\n", encoding="utf-8")
    return path


def _n_tokens(rendered: str) -> int:
    """Tokens of a rendered string under the byte tokenizer, counted independently of it."""
    specials = rendered.count("<|bos|>") + rendered.count("<|eos|>")
    return len(rendered.replace("<|bos|>", "").replace("<|eos|>", "").encode()) + specials


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def test_counts_match_an_independent_byte_count(tmp_path, tok):
    path = _data(tmp_path)
    out = io.StringIO()
    stats = preview(DataConfig(data=str(path), seq_len=16, examples=0), tokenizer=tok, file=out)
    chat = tok.apply_chat_template([{"role": "user", "content": "Add\n2+2"}, {"role": "assistant", "content": "4"}],
                                   tokenize=False)
    user_only = tok.apply_chat_template(USER_ONLY["messages"], tokenize=False)
    # chat records get nothing the template did not render (no EOS appended); text and pairs end with one
    tokens = [len(TEXT.encode()) + 1, len("2+2=4") + 1, _n_tokens(chat), _n_tokens(user_only)]
    trained = [len(TEXT.encode()) + 1, 2, _n_tokens(" 4<|eos|>"), 0]  # text all; response + eos; the turn
    assert chat.endswith("Assistant: 4<|eos|>")
    assert stats["formats"] == {"text": 1, "prompt_completion": 1, "alpaca": 1, "openai": 1}
    assert stats["tokens"] == sum(tokens) and stats["trained_tokens"] == sum(trained)
    assert stats["sequences"] == math.ceil(sum(tokens) / 16)  # contiguous packing: only the last one is short
    assert stats["packing_efficiency"] == pytest.approx(sum(tokens) / (16 * stats["sequences"]))
    assert stats["no_trained_tokens"] == 1 and stats["longer_than_seq_len"] == sum(t > 16 for t in tokens) == 2
    printed = out.getvalue()
    assert f"records: 4 from {path}; formats: alpaca 1, openai 1, prompt_completion 1, text 1" in printed
    assert f"tokens: {sum(tokens)} " in printed and f"trained tokens: {sum(trained)} " in printed
    assert f"records without trained tokens (packed as context, add no loss): 1 ({path}:4)" in printed


def test_trained_tokens_are_bracketed_when_piped_and_coloured_in_a_terminal(tmp_path, tok):
    path = _data(tmp_path)
    out = io.StringIO()  # not a terminal: brackets
    preview(DataConfig(data=str(path), examples=3, limit=3), tokenizer=tok, file=out)
    text = out.getvalue()
    assert f"[[{TEXT}<|eos|>]]" in text and "2+2=[[4<|eos|>]]" in text
    assert "<|bos|>User: Add\n2+2\n\nAssistant:[[ 4<|eos|>]]" in text
    assert "\x1b[" not in text and "records: 3 from" in text and "(--limit)" in text
    out = io.StringIO()
    preview(DataConfig(data=str(path), examples=1, color="always"), tokenizer=tok, file=out)
    assert f"\x1b[1;32m{TEXT}<|eos|>\x1b[0m" in out.getvalue()


def test_preview_accepts_numpy_arrays_from_the_renderer(tmp_path, tok, monkeypatch):
    path = _data(tmp_path)
    expected_out = io.StringIO()
    expected = preview(DataConfig(data=str(path), seq_len=16), tokenizer=tok, file=expected_out)
    real = moecraft.data.render_example

    def as_numpy(record, tokenizer):
        ids, mask = real(record, tokenizer)
        return np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=np.int8)

    monkeypatch.setattr(moecraft.data, "render_example", as_numpy)
    out = io.StringIO()
    assert preview(DataConfig(data=str(path), seq_len=16), tokenizer=tok, file=out) == expected
    assert out.getvalue() == expected_out.getvalue()


def test_cli_loads_only_the_tokenizer_of_a_model_folder(tmp_path, capsys):
    folder = tmp_path / "tokenizer-only"
    byte_tokenizer().save_pretrained(folder)  # no config.json, no weights: only the tokenizer is needed
    path = _data(tmp_path)
    assert main(["data", "--data", str(path), "--model", str(folder), "--examples", "1", "--seq-len", "8"]) == 0
    printed = capsys.readouterr().out
    assert f"--- example 1: {path}:1 (text)" in printed and "records: 4" in printed


def test_real_esft_data_preview(shared_esft_data, tok):
    stats = preview(DataConfig(data=f"{shared_esft_data}/train-intent.jsonl", limit=20, examples=0),
                    tokenizer=tok, file=io.StringIO())
    assert stats["formats"] == {"openai": 20} and 0 < stats["trained_tokens"] < stats["tokens"]


def test_weights_decide_the_trained_turns_end_to_end(tmp_path, tok):
    """OpenAI fine-tuning weights through the whole pipeline: weight 0 on the assistant, 1 on the user."""
    path = tmp_path / "w.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "teach", "weight": 1},
                                             {"role": "assistant", "content": "skip", "weight": 0}]}) + "\n")
    out = io.StringIO()
    preview(DataConfig(data=str(path), examples=1), tokenizer=tok, file=out)
    trained = re.findall(r"\[\[(.*?)\]\]", out.getvalue(), re.S)
    assert any("teach" in t for t in trained) and not any("skip" in t for t in trained), trained
