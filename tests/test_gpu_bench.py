"""bench/gpu.py end to end on the CPU (``--quick``): every GPU benchmark runs, and the JSON and tables say so."""

import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import gpu  # noqa: E402
import pytest  # noqa: E402


def test_gpu_bench_dry_run_writes_every_table(tmp_path):
    out = tmp_path / "gpu"
    assert gpu.main(["--quick", "--out", str(out)]) == 0
    report = json.loads((out / "gpu.json").read_text())
    assert set(report["steps"]) == {"score", "train_step", "train_step_fsdp2", "pesc_layer"}
    assert all(s["rc"] == 0 for s in report["steps"].values()), {k: s.get("tail") for k, s in report["steps"].items()}
    rows = report["steps"]["train_step"]["result"]["rows"]
    assert [r["method"] for r in rows] == ["fft", "esft", "lora", "esft-lora"] * 2
    by = {r["method"]: r["opt_params"] for r in rows}
    assert max(by["esft"], by["lora"]) < by["fft"] and by["esft-lora"] < by["esft"]
    fsdp = report["steps"]["train_step_fsdp2"]["result"]
    assert fsdp["settings"]["fsdp2"] is True
    # FSDP2 on one process holds the same optimiser parameters as the plain step
    assert {r["method"]: r["opt_params"] for r in fsdp["rows"]} == {"fft": by["fft"], "esft": by["esft"]}
    assert len(report["steps"]["pesc_layer"]["result"]["rows"]) == 4
    md = (out / "gpu.md").read_text()
    assert md.count("| method | step s |") == 2 and "Hook overhead" in md and "PESC/(a)" in md
    assert report["versions"]["torch"] and report["versions"]["device"] == "cpu"


def test_gpu_bench_refuses_a_non_empty_out(tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(SystemExit) as exc:
        gpu.main(["--quick", "--out", str(tmp_path)])
    assert exc.value.code == 2
    assert (tmp_path / "keep.txt").read_text() == "x"
    assert "not empty" in capsys.readouterr().err
