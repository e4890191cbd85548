"""Data loading, validation, rendering and packing."""

import json

import pytest

from moecraft.data import (
    load_records,
    mix_sequences,
    pack_sequences,
    render_example,
    render_prompt,
    sample_sequences,
)
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


def _task(n):  # response tokens only from "abc...", so every task token can be told from a general one
    return [{"prompt": "q" * (3 + i % 4), "response": "abcdefg"[: 2 + i % 5]} for i in range(n)]


def _general(n):
    return [{"text": "xyz uvw " * (1 + i % 3)} for i in range(n)]


def _share_mixed_in(seqs, tok):
    """Share of sequences packed from the general data (identified by their bytes; no sequence holds both)."""
    task_ids = set(tok("qabcdefg", add_special_tokens=False)["input_ids"])
    general_ids = set(tok("xyz uvw", add_special_tokens=False)["input_ids"])
    kinds = []
    for ids, _ in seqs:
        t, g = bool(task_ids & set(ids)), bool(general_ids & set(ids))
        assert t != g, "a sequence mixes both data sets"
        kinds.append(g)
    return sum(kinds) / len(kinds)


@pytest.mark.parametrize("n_task,n_general,ratio", [
    (4, 400, 0.5),    # short task file: one pass gives ~3 sequences of 64 tokens, the quota is 20
    (400, 400, 0.5),  # both long: no repetition needed
    (400, 3, 0.25),   # short general file
    (4, 400, 0.3),    # 40 * 0.3 = 12 mixed in
    (4, 400, 0.1),
])
def test_mix_realises_the_requested_share(tok, n_task, n_general, ratio):
    n, seq_len = 40, 64
    logged = []
    seqs = mix_sequences(_task(n_task), _general(n_general), tok, n, ratio, seq_len, seed=3, log=logged.append)
    assert len(seqs) == n and all(len(ids) == seq_len for ids, _ in seqs)
    assert abs(_share_mixed_in(seqs, tok) * n - ratio * n) <= 1  # within one example
    assert len(logged) == 1 and f"asked: {ratio:.1%}" in logged[0]
    assert seqs == mix_sequences(_task(n_task), _general(n_general), tok, n, ratio, seq_len, seed=3, log=None)
    assert seqs != mix_sequences(_task(n_task), _general(n_general), tok, n, ratio, seq_len, seed=4, log=None)


def test_short_task_file_is_cycled_not_shrunk(tok):
    task = _task(4)
    one_pass = sample_sequences(task, tok, 20, 64, seed=3, response_only=True)
    assert len(one_pass) < 5  # sampled once (the old mix), the task side gave a fraction of its quota of 20
    logged = []
    mix_sequences(task, _general(400), tok, 40, 0.5, 64, seed=3, log=logged.append)
    passes = float(logged[0].split("(")[1].split(" passes")[0])
    assert passes > 5 and "20 task sequences" in logged[0] and "20 mixed-in" in logged[0]
    cycled = sample_sequences(task, tok, 20, 64, seed=3, response_only=True, repeat=True)
    assert len(cycled) == 20 and cycled[: len(one_pass) - 1] == one_pass[:-1]  # the first pass is the same order
    # every pass holds each record once, each pass in its own seeded order
    stream = [t for ids, _ in cycled for t in ids]
    rendered = {tuple(render_example(r, tok)[0]): i for i, r in enumerate(task)}
    orders, pos = [], 0
    while pos < len(stream):
        i = next((j for r, j in rendered.items() if tuple(stream[pos:pos + len(r)]) == r), None)
        if i is None:  # the stream ends mid-record
            break
        orders.append(i)
        pos += len(render_example(task[i], tok)[0])
    passes = [orders[k:k + 4] for k in range(0, len(orders) - 3, 4)]
    assert len(passes) > 5 and all(sorted(p) == [0, 1, 2, 3] for p in passes)
    assert len({tuple(p) for p in passes}) > 1


def test_mix_without_mix_data_or_ratio_is_plain_sampling(tok):
    task = _task(400)
    plain = sample_sequences(task, tok, 10, 64, seed=1, response_only=True)
    assert mix_sequences(task, [], tok, 10, 0.5, 64, seed=1, log=None) == plain
    assert mix_sequences(task, _general(50), tok, 10, 0.0, 64, seed=1, log=None) == plain
    with pytest.raises(DataError, match="mix_ratio"):
        mix_sequences(task, _general(50), tok, 10, 1.0, 64, seed=1)
    two = mix_sequences(task, _general(50), tok, 2, 0.9, 64, seed=1, log=None)  # 1.8 rounds to 2: one stays task
    assert _share_mixed_in(two, tok) == 0.5
