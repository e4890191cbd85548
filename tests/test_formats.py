"""The data formats and file types users bring, read into the canonical records (moecraft.data.records)."""

import csv
import json

import pytest
import yaml

from moecraft.cli import build_parser, main
from moecraft.config import ConfigError, resolve
from moecraft.data import DataOptions, load_records, read_records
from moecraft.errors import DataError

# One record per format, and the canonical record each must become (written out by hand).
RAW = [
    {"instruction": "Add the numbers.", "input": "2 3", "output": "5", "id": 1},
    {"instruction": "Say hi.", "input": "", "output": "hi", "system": "Be brief."},
    {"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "q1"},
                       {"from": "gpt", "value": "a1"}, {"from": "function_call", "value": "{\"name\": \"f\"}"},
                       {"from": "observation", "value": "42"}, {"from": "gpt", "value": "a2"}]},
    {"messages": [{"role": "developer", "content": "D"},
                  {"role": "user", "content": [{"type": "text", "text": "look"}, {"type": "text", "text": "here"}]},
                  {"role": "assistant", "content": "draft", "weight": 0},
                  {"role": "user", "content": "again"}, {"role": "assistant", "content": "final", "weight": 1}],
     "tools": "[]"},
    {"prompt": "2+2=", "completion": "4"},
    {"prompt": "3+3=", "response": "6", "source": "x"},
    {"text": "plain text for continued pretraining"},
]
CANONICAL = [
    {"messages": [{"role": "user", "content": "Add the numbers.\n2 3"}, {"role": "assistant", "content": "5"}],
     "id": 1},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi."},
                  {"role": "assistant", "content": "hi"}]},
    {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "q1"},
                  {"role": "assistant", "content": "a1"}, {"role": "assistant", "content": "{\"name\": \"f\"}"},
                  {"role": "tool", "content": "42"}, {"role": "assistant", "content": "a2"}]},
    {"messages": [{"role": "system", "content": "D"}, {"role": "user", "content": "look\nhere"},
                  {"role": "assistant", "content": "draft", "weight": 0},
                  {"role": "user", "content": "again"}, {"role": "assistant", "content": "final", "weight": 1}],
     "tools": "[]"},
    {"prompt": "2+2=", "response": "4"},
    {"prompt": "3+3=", "response": "6", "source": "x"},
    {"text": "plain text for continued pretraining"},
]
FORMATS = ["alpaca", "alpaca", "sharegpt", "openai", "prompt_completion", "prompt_completion", "text"]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_every_format_becomes_the_canonical_record(tmp_path):
    loaded = read_records(str(_jsonl(tmp_path / "d.jsonl", RAW)))
    assert [x.record for x in loaded] == CANONICAL
    assert [x.format for x in loaded] == FORMATS
    assert [x.where for x in loaded] == [f"{tmp_path / 'd.jsonl'}:{i}" for i in range(1, 8)]


def test_openai_edge_cases(tmp_path):
    rows = [
        # an assistant turn that only calls a tool: no content, tool_calls kept for the chat template
        {"messages": [{"role": "user", "content": "t?"},
                      {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function"}]},
                      {"role": "tool", "content": "18C", "tool_call_id": "c1"},
                      {"role": "assistant", "content": "18C"}]},
        # TRL's conversational prompt-completion: prompt turns untrained, completion turns trained
        {"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "earlier"}],
         "completion": [{"role": "assistant", "content": "a"}]},
        # sharegpt under "messages" with a 'system' column (LLaMA-Factory)
        {"messages": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "y"}], "system": "sys"},
    ]
    recs = load_records(str(_jsonl(tmp_path / "o.jsonl", rows)))
    assert recs[0]["messages"][1] == {"role": "assistant", "content": "", "tool_calls": [{"id": "c1", "type": "function"}]}
    assert recs[0]["messages"][2] == {"role": "tool", "content": "18C", "tool_call_id": "c1"}
    assert [m.get("weight") for m in recs[1]["messages"]] == [0, 0, 1]
    assert recs[2] == {"messages": [{"role": "system", "content": "sys"}, {"role": "user", "content": "x"},
                                    {"role": "assistant", "content": "y"}]}


OPENAI = {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a", "weight": 0}]}


def _table(rows):
    """An arrow table with the union of the rows' keys (from_pylist takes the first row's keys only)."""
    import pyarrow as pa

    keys = list(dict.fromkeys(k for r in rows for k in r))
    return pa.Table.from_pydict({k: [r.get(k) for r in rows] for k in keys})


def _write_all_types(tmp_path):
    """RAW in every file type; csv cells hold JSON for the message lists."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    paths = {"jsonl": _jsonl(tmp_path / "d.jsonl", RAW)}
    paths["json"] = tmp_path / "d.json"
    paths["json"].write_text(json.dumps(RAW, indent=2), encoding="utf-8")
    paths["json1"] = tmp_path / "one_line.json"
    paths["json1"].write_text(json.dumps(RAW), encoding="utf-8")
    # columnar files: one file per format (a column of records of another format would be all nulls)
    # (arrow cannot hold RAW[3]'s mix of string and part-list contents; OPENAI has a weight on one message
    # only, which arrow fills with nulls on the others)
    groups = [RAW[0:2], RAW[2:3], [OPENAI], RAW[4:5], RAW[5:6], RAW[6:7]]
    folder = tmp_path / "parquet_folder"
    folder.mkdir()
    for i, g in enumerate(groups):
        pq.write_table(_table(g), folder / f"part-{i}.parquet")
    paths["parquet_folder"] = folder
    paths["parquet"] = tmp_path / "alpaca.parquet"
    pq.write_table(_table(RAW[0:2]), paths["parquet"])
    for suffix, delim in (("csv", ","), ("tsv", "\t")):
        paths[suffix] = tmp_path / f"d.{suffix}"
        with paths[suffix].open("w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh, delimiter=delim)
            w.writerow(["instruction", "input", "output", "id", "system"])
            w.writerow(["Add the numbers.", "2 3", "5", "1", ""])
            w.writerow(["Say hi.", "", "hi", "", "Be brief."])
    ds = datasets.Dataset(_table(RAW[0:2]))
    ds.save_to_disk(str(tmp_path / "ds"))
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "dsdict"))
    paths["ds"], paths["dsdict"] = tmp_path / "ds", tmp_path / "dsdict"
    paths["arrow_stream"] = next((tmp_path / "ds").glob("*.arrow"))  # datasets writes the IPC stream format
    paths["arrow_file"] = tmp_path / "f.arrow"
    with pa.ipc.new_file(str(paths["arrow_file"]), _table(RAW[0:2]).schema) as writer:
        writer.write_table(_table(RAW[0:2]))
    return paths


def test_every_file_type_reads_the_same_records(tmp_path):
    p = _write_all_types(tmp_path)
    for key in ("jsonl", "json", "json1"):
        assert load_records(str(p[key])) == CANONICAL, key
    in_folder = [*CANONICAL[0:3], OPENAI, *CANONICAL[4:]]
    assert load_records(str(p["parquet_folder"])) == in_folder  # a folder of files, read in name order
    alpaca = CANONICAL[0:2]
    for key in ("parquet", "ds", "dsdict", "arrow_stream", "arrow_file"):
        assert load_records(str(p[key])) == alpaca, key
    csv_alpaca = [{**alpaca[0], "id": "1"}, alpaca[1]]  # csv cells are strings; empty cells are missing
    assert load_records(str(p["csv"])) == csv_alpaca and load_records(str(p["tsv"])) == csv_alpaca
    # where each record came from: JSON lines of the array elements, csv lines, parquet rows
    assert [x.where for x in read_records(str(p["json"]))][:3] == [f"{p['json']}:2", f"{p['json']}:8",
                                                                    f"{p['json']}:14"]
    assert [x.where for x in read_records(str(p["csv"]))] == [f"{p['csv']}:2", f"{p['csv']}:3"]
    assert read_records(str(p["parquet"]))[1].where == f"{p['parquet']}: row 2"


def test_csv_cells_holding_json_messages_and_multiline_cells(tmp_path):
    path = tmp_path / "chat.csv"
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["messages", "note"])
        w.writerow([json.dumps(RAW[3]["messages"]), "two\nlines"])
        w.writerow([json.dumps([{"role": "user", "content": "x"}]) + "]", "bad JSON on line 4"])
    with pytest.raises(DataError, match=rf"^{path}:4 \(column 'messages'\): not valid JSON"):
        load_records(str(path))
    rec = load_records(str(path), limit=1)[0]
    assert rec["messages"] == CANONICAL[3]["messages"] and rec["note"] == "two\nlines"


def test_limit_stops_reading(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a"}\n{"text": "b"}\n{broken\n', encoding="utf-8")
    assert load_records(str(path), limit=2) == [{"text": "a"}, {"text": "b"}]
    with pytest.raises(DataError, match=":3: not valid JSON"):
        load_records(str(path))


# ----------------------------------------------------------------------------- forcing and mapping
TATSU = {"instruction": "Name a colour.", "input": "", "output": "Red.",
         "text": "Below is an instruction...\n### Response:\nRed."}  # the columns of tatsu-lab/alpaca


def test_text_next_to_instruction_fields_is_an_error_until_forced(tmp_path):
    path = _jsonl(tmp_path / "tatsu.jsonl", [TATSU])
    with pytest.raises(DataError, match=rf"^{path}:1: record mixes formats: alpaca \('instruction', 'output'\), "
                                        r"text \('text'\); force one with --data-format alpaca\|text$"):
        load_records(str(path))
    assert load_records(str(path), options=DataOptions(data_format="text")) == [{"text": TATSU["text"]}]
    assert load_records(str(path), options=DataOptions(data_format="alpaca")) == [
        {"messages": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Red."}]}]
    half = _jsonl(tmp_path / "half.jsonl", [{"instruction": "i", "text": "t"}])  # no output: still a mix
    with pytest.raises(DataError, match="text \\('text'\\) next to 'instruction'; force one with --data-format text|alpaca"):
        load_records(str(half))


def test_forced_format_with_a_missing_field_names_file_line_and_field(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [{"instruction": "i", "output": "o"}, {"instruction": "i2"}])
    with pytest.raises(DataError, match=rf"^{path}:2: alpaca record has no 'output' \(fields \['instruction'\]\)$"):
        load_records(str(path), options=DataOptions(data_format="alpaca"))
    with pytest.raises(DataError, match=rf"^{path}:1: sharegpt record has no 'messages' or 'conversations'"):
        load_records(str(path), options=DataOptions(data_format="sharegpt"))


def test_field_and_role_mapping(tmp_path):
    rows = [{"dialog": [{"speaker": "client", "says": "hi", "train": 0},
                        {"speaker": "bot", "says": "hello"}, {"speaker": "client", "says": "bye"}]},
            {"question": "q", "context": "c", "answer": "a"}]
    path = _jsonl(tmp_path / "d.jsonl", rows)
    opts = DataOptions(field_messages="dialog", message_property_mappings={"role": "speaker", "content": "says",
                                                                            "weight": "train"},
                       roles={"user": "client", "assistant": ["bot", "agent"]},
                       data_columns={"instruction": "question", "input": "context", "output": "answer"},
                       roles_to_train=["user", "assistant"])
    assert load_records(str(path), options=opts) == [
        {"messages": [{"role": "user", "content": "hi", "weight": 0},  # the message's own weight wins
                      {"role": "assistant", "content": "hello", "weight": 1},
                      {"role": "user", "content": "bye", "weight": 1}]},
        {"messages": [{"role": "user", "content": "q\nc", "weight": 1}, {"role": "assistant", "content": "a",
                                                                         "weight": 1}]}]
    with pytest.raises(DataError, match="unrecognised record"):  # without the mapping: not a known shape
        load_records(str(path))


def test_options_are_the_same_from_cli_yaml_and_python(tmp_path, capsys):
    argv = ["data", "--data", "d.jsonl", "--data-format", "sharegpt", "--field-messages", "dialog",
            "--message-property-mappings", "role=speaker,content=says", "--roles", "assistant=bot,assistant=agent",
            "--roles-to-train", "assistant,tool", "--data-columns", "system=sys"]
    parser = build_parser()
    from_cli = resolve(parser.parse_args(argv)._module.CONFIG, parser.parse_args(argv))
    assert main([*argv, "--print-config"]) == 0
    yaml_path = tmp_path / "c.yaml"
    yaml_path.write_text(capsys.readouterr().out)
    as_yaml = yaml.safe_load(yaml_path.read_text())
    assert as_yaml["roles"] == {"assistant": ["bot", "agent"]} and as_yaml["roles_to_train"] == ["assistant", "tool"]
    args = parser.parse_args(["data", "--config", str(yaml_path)])
    from_yaml = resolve(args._module.CONFIG, args)
    from moecraft.commands.data import DataConfig

    from_python = DataConfig(data="d.jsonl", data_format="sharegpt", field_messages="dialog",
                             message_property_mappings={"role": "speaker", "content": "says"},
                             roles={"assistant": ["bot", "agent"]}, roles_to_train=["assistant", "tool"],
                             data_columns={"system": "sys"})
    assert from_cli == from_yaml == from_python
    # and every command that reads data has the same options
    required = {"train": ["--model", "m", "--data", "d", "--out", "o"]}
    for command in ("score", "train", "eval", "demo"):
        args = parser.parse_args([command, *required.get(command, []), *argv[3:]])
        cfg = resolve(args._module.CONFIG, args)
        assert DataOptions.values_of(cfg) == DataOptions.values_of(from_python), command


def test_train_reads_every_data_source_through_the_options(tmp_path):
    """train's --data, --eval-data and --mix-data all go through the same reader and options."""
    sharegpt = [{"dialog": [{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": f"a{i}"}]} for i in range(6)]
    data = _jsonl(tmp_path / "t.jsonl", sharegpt)
    out = tmp_path / "run"
    base = ["train", "--method", "fft", "--model", "tiny:qwen3_moe", "--data", str(data), "--out", str(out),
            "--seq-len", "32", "--max-steps", "1", "--eval-sequences", "1", "--progress", "false"]
    assert main([*base, "--field-messages", "dialog"]) == 0
    assert main([*base, "--eval-data", str(data), "--mix-data", str(data)]) == 2  # without it: unrecognised


@pytest.mark.parametrize("options, message", [
    (dict(data_format="jsonl"), "option 'data_format' must be one of"),
    (dict(roles={"bot": "assistant"}), "option 'roles': 'bot' is not a role; keys are ['system', 'user', 'assistant', 'tool']"),
    (dict(roles_to_train=["gpt"]), "option 'roles_to_train': unknown role(s) ['gpt']"),
    (dict(message_property_mappings={"speaker": "from"}), "option 'message_property_mappings': unknown key 'speaker'"),
    (dict(data_columns={"output": ""}), "option 'data_columns': output must name one field"),
])
def test_bad_options_are_config_errors(options, message):
    with pytest.raises(ConfigError) as err:
        DataOptions(**options)
    assert message in str(err.value)


def test_hub_rows_go_through_the_same_reader(monkeypatch):
    """A hub id is read with datasets.load_dataset (no network in tests: it returns a local Dataset here)."""
    import datasets

    calls = []

    def fake_load(name, split):
        calls.append((name, split))
        return datasets.Dataset(_table(RAW[0:2]))

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    loaded = read_records("someone/alpaca-like:validation")
    assert calls == [("someone/alpaca-like", "validation")]
    assert [x.record for x in loaded] == CANONICAL[0:2]
    assert loaded[1].where == "someone/alpaca-like:validation: row 2"


def test_eval_tasks_read_every_file_type_and_format(tmp_path):
    """eval --tasks reads the same file types; alpaca/sharegpt rows become chat rows, the last turn the reference."""
    from moecraft.eval.tasks import load_items
    from moecraft.models import byte_tokenizer

    tok = byte_tokenizer()
    p = _write_all_types(tmp_path)
    for key in ("parquet", "csv", "json", "ds"):
        items = load_items(str(p[key]), tok, limit=2)
        assert [it.references for it in items] == [["5"], ["hi"]], key
        assert items[0].prompt == tok.apply_chat_template([{"role": "user", "content": "Add the numbers.\n2 3"}],
                                                          tokenize=False, add_generation_prompt=True)
    sharegpt = load_items(str(p["jsonl"]), tok, limit=3)[2]  # (the text row 7 has no prompt: an error)
    assert sharegpt.references == ["a2"] and sharegpt.prompt.endswith("42<|eos|>Assistant:")
