"""Data loading, validation, rendering and packing."""

import json

import pytest

from moecraft.data import load_records, pack_sequences, render_example, render_prompt, sample_sequences
from moecraft.errors import DataError
from moecraft.models import byte_tokenizer


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def test_jsonl_shapes(tmp_path, tok):
    path = _write(tmp_path / "d.jsonl", [
        json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
                    "id": 7}),
        json.dumps({"prompt": "2+2=", "response": "4"}),
        json.dumps({"prompt": "3+3=", "completion": "6"}),
        json.dumps({"text": "plain text"}),
    ])
    recs = load_records(path)
    assert len(recs) == 4
    ids, mask = render_example(recs[1], tok)
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "4<|eos|>"
    assert tok.decode([i for i, m in zip(ids, mask) if not m]) == "2+2="
    ids, mask = render_example(recs[3], tok)
    assert all(mask) and tok.decode(ids) == "plain text<|eos|>"
    assert render_prompt(recs[0], tok).endswith("User: hi\n\nAssistant:")


@pytest.mark.parametrize("lines, message", [
    (['{"text": "ok"}', "{not json"], r"d.jsonl:2: not valid JSON"),
    (['{"text": "ok"}', "[1, 2]"], r"d.jsonl:2: expected a JSON object"),
    (['{"question": "q", "answer": "a"}'], r"d.jsonl:1: unrecognised record with fields \['answer', 'question'\]"),
    (['{"messages": [{"role": "robot", "content": "x"}]}'], r"d.jsonl:1: messages\[0\] must be"),
    (['{"messages": []}'], r"d.jsonl:1: 'messages' must be a non-empty list"),
    (['{"prompt": "p", "response": 3}'], r"d.jsonl:1: 'prompt' and 'response' must be strings"),
    ([""], r"d.jsonl: empty file"),
])
def test_bad_data_names_file_and_line(tmp_path, lines, message):
    path = _write(tmp_path / "d.jsonl", lines)
    with pytest.raises(DataError, match=message):
        load_records(path)


def test_missing_file_and_unknown_builtin(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_records(str(tmp_path / "nope.jsonl"))
    with pytest.raises(DataError, match="unknown built-in task 'poetry'"):
        load_records("builtin:poetry")


def test_multi_turn_chat_masks_every_assistant_turn(tok):
    rec = {"messages": [
        {"role": "system", "content": "S"}, {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]}
    ids, mask = render_example(rec, tok)
    assert tok.decode(ids) == tok.apply_chat_template(rec["messages"], tokenize=False)
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == " b<|eos|> d<|eos|>"


def test_datasets_folder(tmp_path):
    import datasets

    datasets.Dataset.from_list([{"text": "one"}, {"text": "two"}]).save_to_disk(str(tmp_path / "ds"))
    assert [r["text"] for r in load_records(str(tmp_path / "ds"))] == ["one", "two"]


def test_packing_concatenates_into_fixed_length_chunks():
    examples = [([1, 2, 3], [0, 1, 1]), ([4, 5], [1, 1]), ([6, 7, 8, 9], [0, 0, 1, 1])]
    chunks = pack_sequences(examples, 4)
    assert chunks == [([1, 2, 3, 4], [0, 1, 1, 1]), ([5, 6, 7, 8], [1, 0, 0, 1]), ([9], [1])]


def test_sampling_is_seeded_and_sized(tok):
    recs = load_records("builtin:arithmetic")
    a = sample_sequences(recs, tok, 5, 128, seed=1)
    b = sample_sequences(recs, tok, 5, 128, seed=1)
    c = sample_sequences(recs, tok, 5, 128, seed=2)
    assert a == b and a != c
    assert [len(ids) for ids, _ in a] == [128] * 5
    assert all(all(m) for _, m in a)  # all tokens counted by default
    r = sample_sequences(recs, tok, 5, 128, seed=1, response_only=True)
    assert [ids for ids, _ in r] == [ids for ids, _ in a] and 0 < sum(map(sum, (m for _, m in r))) < 640


def test_real_esft_data_loads(shared_esft_data, tok):
    recs = load_records(f"{shared_esft_data}/train-intent.jsonl", limit=5)
    ids, mask = render_example(recs[0], tok)
    assert 0 < sum(mask) < len(ids)
