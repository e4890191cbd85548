"""Property test of the record reader (issue 13): whatever the bytes of a data file, ``moecraft data``
either succeeds with canonical records or exits 2 with one error line naming the file; never a traceback.

Bounded for CI: a fixed number of derandomized examples, no deadline.
"""

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moecraft.cli import main
from moecraft.data import DataOptions, check_record, load_records
from moecraft.errors import DataError

KEYS = ["messages", "conversations", "role", "content", "from", "value", "weight", "type", "text", "instruction",
        "input", "output", "system", "history", "prompt", "completion", "response", "tool_calls", "id"]
ROLES = ["user", "assistant", "system", "tool", "human", "gpt", "observation", "bot", ""]
TEXT = st.one_of(
    st.text(max_size=12),
    st.sampled_from(ROLES + ["\ud800", "a\udfffb", "\x00", "\u2028", "text", "image_url"]),
)
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-2, 2), st.integers(), st.floats(allow_nan=True),
                    TEXT)


def _json_values():
    return st.recursive(
        SCALARS,
        lambda inner: st.one_of(st.lists(inner, max_size=4),
                                st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=4)), inner,
                                                max_size=5)),
        max_leaves=25,
    )


# records that are close to the real formats, so the fuzzer reaches deep into the converters
MESSAGE = st.fixed_dictionaries({}, optional={
    "role": st.one_of(st.sampled_from(ROLES), _json_values()), "from": st.sampled_from(ROLES),
    "content": st.one_of(TEXT, st.lists(st.one_of(
        st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url", 1]), "text": TEXT}), TEXT), max_size=3),
        st.none()),
    "value": TEXT, "weight": st.one_of(st.sampled_from([0, 1, True, 2, 0.5, "1"]), SCALARS),
    "tool_calls": st.lists(SCALARS, max_size=2)})
GOOD_MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(ROLES[:-2]), "content": TEXT},
                                     optional={"weight": st.sampled_from([0, 1, True])})
NEAR_RECORD = st.fixed_dictionaries({}, optional={
    "messages": st.one_of(st.lists(GOOD_MESSAGE, min_size=1, max_size=4), st.lists(MESSAGE, max_size=4),
                          _json_values()),
    "conversations": st.lists(MESSAGE, max_size=3),
    "instruction": TEXT, "input": st.one_of(TEXT, st.none()), "output": TEXT, "system": TEXT,
    "history": st.lists(st.lists(TEXT, max_size=3), max_size=2),
    "prompt": st.one_of(TEXT, st.lists(MESSAGE, max_size=2)),
    "completion": st.one_of(TEXT, st.lists(MESSAGE, max_size=2)), "response": TEXT, "text": TEXT,
})
RECORD = st.one_of(NEAR_RECORD, _json_values())


def _dump(value) -> bytes:
    # half of the files escape non-ASCII (lone surrogates become valid JSON escapes), half write it raw
    # (lone surrogates become bytes that are not UTF-8)
    return json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass")


FILES = st.one_of(
    st.lists(RECORD, min_size=0, max_size=4).map(lambda rs: (".jsonl", b"\n".join(_dump(r) for r in rs))),
    st.lists(RECORD, min_size=0, max_size=4).map(lambda rs: (".jsonl", "\n".join(json.dumps(r) for r in rs)
                                                             .encode())),
    st.lists(RECORD, max_size=4).map(lambda rs: (".json", json.dumps(rs, indent=1).encode())),
    st.binary(max_size=64).map(lambda b: (".jsonl", b)),
    st.binary(max_size=64).map(lambda b: (".json", b"[" + b)),
    st.binary(max_size=32).map(lambda b: (".parquet", b"PAR1" + b)),
    st.lists(st.lists(TEXT, max_size=4), max_size=4).map(
        lambda rows: (".csv", "\n".join(",".join(json.dumps(c) for c in r) for r in
                                        [["instruction", "output", "messages"], *rows]).encode("utf-8",
                                                                                                "surrogatepass"))),
    st.integers(1, 3000).map(lambda n: (".jsonl", b'{"text": ' + b"[" * n + b"]" * n + b"}")),
    st.integers(4000, 5000).map(lambda n: (".jsonl", b'{"text": "a", "n": ' + b"7" * n + b"}")),
)


@settings(max_examples=150, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(file=FILES, forced=st.sampled_from(["auto", "auto", "openai", "sharegpt", "alpaca", "prompt_completion",
                                           "text"]))
def test_any_file_reads_or_fails_with_one_line(tmp_path_factory, file, forced):
    suffix, content = file
    path = tmp_path_factory.mktemp("fuzz") / f"data{suffix}"
    path.write_bytes(content)
    try:
        records = load_records(str(path), options=DataOptions(data_format=forced))
    except DataError as exc:
        msg = str(exc)
        assert "\n" not in msg and (str(path) in msg), msg
    else:
        for rec in records:
            check_record(rec, "canonical")
            for m in rec.get("messages", []):
                assert set(m) >= {"role", "content"} and m.get("weight", 0) in (0, 1)


@pytest.mark.parametrize("content", [b'{"text": "\\ud800"}', b"\xff\xfe", b"[" * 50000, b'{"text": 1e999}'])
def test_cli_gives_one_line_and_exit_2(tmp_path, capsys, content):
    path = tmp_path / "d.jsonl"
    path.write_bytes(content)
    assert main(["data", "--data", str(path), "--examples", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"moecraft data: error: {path}:1: ") and "Traceback" not in err
