"""A reduced `moecraft demo` end to end: every step runs and the report shows before/after per method."""

import base64
import json
import re

from moecraft.cli import main


def test_reduced_demo_writes_report_with_before_and_after(tmp_path):
    out = tmp_path / "demo"
    rc = main(["demo", "--out", str(out), "--steps", "2", "--seq-len", "64", "--n-sequences", "2",
               "--eval-limit", "3", "--max-new-tokens", "4"])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["results"]) == {"moe-base", "esft", "fft", "lora", "dense-base", "pesc"}
    for name in ("esft", "fft", "lora", "pesc"):
        assert summary["train"][name]["steps"] == 2
        assert (out / "train" / name / "artifact.json").is_file()
        assert (out / "eval" / name / "results.json").is_file()
    html = (out / "report.html").read_text()
    for name in ("esft", "fft", "lora", "pesc"):  # a before/after row per method
        assert re.search(rf"<tr><td>{name}</td><td>intent_json</td>", html)
    images = re.findall(r'data:image/png;base64,([A-Za-z0-9+/=]+)', html)
    assert len(images) >= 6 and all(base64.b64decode(i).startswith(b"\x89PNG") for i in images)
    ppl = summary["results"]["fft"]["task answer ppl"]
    assert f"{ppl:.4g}" in html
    for step_out in ("scores/task.json", "scores/after-esft.json", "experts.json", "analysis/analysis.json",
                     "run_info.json"):
        assert (out / step_out).is_file(), step_out
