"""Output folders and files never lose work (issue 13): one test per case the issue names, then the rules.

Cases: a new train into a run's folder; two runs into one folder; --data inside --out; merge --out equal
to the base; score over an existing scores file (full disk); two eval tasks of one file name; a killed
export or merge. Rules: --overwrite replaces only once the new output is complete, inputs inside or around
an output are refused for every command, file modes follow the umask.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from test_bad_inputs import fails  # the CLI error contract: exit 2, one line, no traceback

from moecraft.cli import main
from moecraft.errors import MoecraftError
from moecraft.files import MARKER, output_lock, write_json
from moecraft.models import byte_tokenizer, load_model, tiny_model
from moecraft.train import TrainConfig, train

SRC = str(Path(__file__).resolve().parents[1] / "src")


def snapshot(path: Path) -> dict[str, str]:
    """sha256 of every file under ``path`` (or of ``path`` itself), by relative name."""
    path = Path(path)
    if path.is_file():
        return {"": hashlib.sha256(path.read_bytes()).hexdigest()}
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def leftovers(folder: Path) -> list[str]:
    """moecraft's temporary, old and lock siblings in ``folder``."""
    return sorted(p.name for p in folder.iterdir() if ".moecraft-" in p.name)


def _data(path: Path, n: int = 40) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"prompt": f"{i} plus {i} is", "response": f" {2 * i}"}) + "\n"
                            for i in range(n)))
    return path


def _train_cfg(out, **kw) -> TrainConfig:
    base = dict(model="tiny:deepseek_v2", data="builtin:intent", out=str(out), method="fft", seq_len=128,
                max_steps=2, eval_sequences=1, lr=1e-3, progress=False)
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def base_and_run(tmp_path_factory):
    """A tiny base model saved as a folder, and an FFT run trained on it (1 step)."""
    root = tmp_path_factory.mktemp("outputs")
    base = root / "base"
    tiny_model("deepseek_v2").save_pretrained(base)
    byte_tokenizer().save_pretrained(base)
    train(_train_cfg(root / "run", model=str(base), max_steps=1))
    return base, root / "run"


# ----------------------------------------------------------------------------- the cases
def test_new_train_into_a_finished_run_is_refused_and_its_metrics_kept(capsys, tmp_path):
    out = tmp_path / "run"
    train(_train_cfg(out))
    before = snapshot(out)
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3  # 2 steps + final eval
    msg = fails(capsys, "train", "--model", "tiny:deepseek_v2", "--data", "builtin:intent", "--method", "fft",
                "--out", out, "--seq-len", "128", "--max-steps", "1", "--progress", "false")
    assert msg == (f"--out {out} is not empty; use --resume to continue the run in it, or --overwrite to "
                   "replace it")
    assert snapshot(out) == before  # metrics.jsonl and the artifact as they were
    # --overwrite: a new run replaces the old one
    train(_train_cfg(out, max_steps=1, overwrite=True))
    assert [json.loads(x).get("step") for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 1]
    assert not (out / MARKER).exists() and leftovers(tmp_path) == []


def test_unfinished_train_folder_is_refused_by_readers_and_named_by_a_new_run(capsys, tmp_path):
    out = tmp_path / "run"
    train(_train_cfg(out, max_steps=3, save_every=1), stop_after=1)  # a stand-in for a killed run
    assert (out / MARKER).exists()
    msg = fails(capsys, "train", "--model", "tiny:deepseek_v2", "--data", "builtin:intent", "--out", out)
    assert msg.startswith(f"--out {out} is not empty (an unfinished run); use --resume")
    assert fails(capsys, "eval", "--adapter", out, "--out", tmp_path / "ev").startswith(
        f"{out} is an unfinished moecraft output ({MARKER} present")
    train(_train_cfg(out, max_steps=3, save_every=1, resume=True))  # --resume finishes it: accepted from then on
    assert not (out / MARKER).exists() and (out / "artifact.json").is_file()


def test_a_second_run_into_a_folder_being_written_fails_at_once(capsys, tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            from moecraft.files import output_lock
            with output_lock({str(out)!r}):
                print("locked", flush=True)
                sys.stdin.read()
            """)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": SRC})
    try:
        assert holder.stdout.readline().strip() == "locked"
        msg = fails(capsys, "train", "--model", "tiny:deepseek_v2", "--data", "builtin:intent", "--method", "fft",
                    "--out", out, "--seq-len", "128", "--max-steps", "1", "--progress", "false")
        assert msg == (f"another moecraft run is writing to {out} (pid {holder.pid}); wait for it to finish, or "
                       "write somewhere else")
        assert not out.exists()
        scores = tmp_path / "scores.json"
        with output_lock(scores):  # the same lock guards single-file outputs; the holder is this process
            msg = fails(capsys, "score", "--model", "tiny:deepseek_v2", "--out", scores)
            assert msg.startswith(f"another moecraft run is writing to {scores} (pid {os.getpid()})")
    finally:
        holder.communicate("")
    assert holder.returncode == 0
    # once the holder has finished, the lock file is gone and the folder is free
    assert leftovers(tmp_path) == []
    train(_train_cfg(out, max_steps=1))
    assert (out / "artifact.json").is_file() and leftovers(tmp_path) == []


def test_output_that_contains_the_training_data_is_refused(capsys, tmp_path):
    proj = tmp_path / "proj"
    data = _data(proj / "metrics.jsonl")
    before = snapshot(proj)
    for extra in ([], ["--resume"], ["--overwrite"]):
        msg = fails(capsys, "train", "--model", "tiny:deepseek_v2", "--method", "fft", "--data", data,
                    "--out", proj, *extra)
        assert msg == f"--out {proj} contains the input {data}; write the output somewhere else"
    # the same through a symlink to the folder (paths are compared resolved)
    link = tmp_path / "link"
    link.symlink_to(proj, target_is_directory=True)
    msg = fails(capsys, "train", "--model", "tiny:deepseek_v2", "--method", "fft", "--data", data, "--out", link,
                "--overwrite")
    assert msg == f"--out {link} contains the input {data}; write the output somewhere else"
    assert snapshot(proj) == before


def test_merge_out_equal_to_or_inside_the_base_is_refused(capsys, base_and_run):
    base, run = base_and_run
    before = snapshot(base)
    assert fails(capsys, "merge", "--artifact", run, "--base", base, "--out", base, "--overwrite") == \
        f"--out {base} is the input {base}; write the output somewhere else"
    assert fails(capsys, "merge", "--artifact", run, "--base", base, "--out", base / "merged") == \
        f"--out {base / 'merged'} is inside the input {base}; write the output somewhere else"
    assert fails(capsys, "merge", "--artifact", run, "--out", run, "--overwrite") == \
        f"--out {run} is the input {run}; write the output somewhere else"
    assert snapshot(base) == before


def test_score_over_an_existing_file_is_refused_and_a_full_disk_keeps_the_old_file(capsys, tmp_path, monkeypatch):
    from moecraft.esft.stats import ExpertScores, ScoreConfig, score_experts

    out = tmp_path / "scores.json"
    cfg = ScoreConfig(model="tiny:deepseek_v2", data="builtin:intent", out=out, n_sequences=2, seq_len=32)
    first = score_experts(cfg)
    before = snapshot(out)
    assert fails(capsys, "score", "--model", "tiny:deepseek_v2", "--out", out, "--seq-len", "32",
                 "--n-sequences", "2") == f"--out {out} exists; use --overwrite to replace it"

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("moecraft.files.os.fsync", full_disk)
    with pytest.raises(OSError, match="No space left"):
        score_experts(ScoreConfig(**{**cfg.__dict__, "data": "builtin:arithmetic", "overwrite": True}))
    assert snapshot(out) == before and leftovers(tmp_path) == []  # the old file whole, no half file beside it
    monkeypatch.undo()
    second = score_experts(ScoreConfig(**{**cfg.__dict__, "data": "builtin:arithmetic", "overwrite": True}))
    loaded = ExpertScores.load(out)
    assert loaded.token_count.equal(second.token_count) and loaded.meta["data"] == "builtin:arithmetic"
    assert first.meta["data"] == "builtin:intent"


def test_two_eval_tasks_with_one_file_name_keep_their_own_predictions(capsys, tmp_path):
    a = _data(tmp_path / "a" / "eval.jsonl", 3)
    b = tmp_path / "b" / "eval.jsonl"
    b.parent.mkdir()
    b.write_text("".join(json.dumps({"prompt": f"say {w}", "response": w}) + "\n" for w in ("x", "y")))
    out = tmp_path / "ev"
    assert main(["eval", "--model", "tiny:llama", "--tasks", f"{a},{b}", "--max-new-tokens", "2", "--out",
                 str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    names = {src: res["tasks"][src]["predictions"] for src in (str(a), str(b))}
    assert len(set(names.values())) == 2 and all(n.startswith("predictions-eval-") for n in names.values())
    for src, name in names.items():
        prompts = [json.loads(x)["prompt"] for x in (out / name).read_text().splitlines()]
        want = [json.loads(x)["prompt"] for x in Path(src).read_text().splitlines()]
        assert prompts == want
    assert fails(capsys, "eval", "--model", "tiny:llama", "--tasks", f"{a},{a}", "--out", tmp_path / "ev2") == \
        f"task(s) ['{a}'] given more than once in --tasks"
    assert not (tmp_path / "ev2").exists()


_DIE = """
import os, sys
import moecraft.commands.merge, moecraft.runinfo
def die(*a, **k):  # everything but run_info is written: a hard kill (no cleanup runs)
    os._exit(9)
moecraft.commands.merge.write_run_info = moecraft.runinfo.write_run_info = die
from moecraft.cli import main
main(sys.argv[1:])
"""


def _killed(*argv) -> None:
    proc = subprocess.run([sys.executable, "-c", _DIE, *map(str, argv)], env={**os.environ, "PYTHONPATH": SRC},
                          capture_output=True, text=True)
    assert proc.returncode == 9, proc.stderr[-2000:]


def test_a_killed_merge_or_export_leaves_no_folder_that_commands_accept(capsys, tmp_path, base_and_run):
    base, run = base_and_run
    crafted = tmp_path / "crafted"
    assert main(["craft", "--model", "tiny:llama", "--output", str(crafted), "--num-experts", "2",
                 "--adapter-dim", "4", "--quantize", "none"]) == 0
    for argv, out in ((["merge", "--artifact", run, "--out"], tmp_path / "merged"),
                      (["export", "--artifact", crafted, "--output"], tmp_path / "exported")):
        _killed(*argv, out)
        assert not out.exists()
        (tmp,) = [p for p in tmp_path.iterdir() if p.name.startswith(f".{out.name}.moecraft-tmp-")]
        assert (tmp / MARKER).exists() and (tmp / "config.json").is_file()  # weights were written, then killed
        with pytest.raises(MoecraftError, match="unfinished moecraft output"):
            load_model(str(tmp))
        assert fails(capsys, "generate", "--model", tmp, "--prompt", "hi", "--trust-remote-code").startswith(
            f"{tmp} is an unfinished moecraft output")
        assert main([*map(str, argv), str(out)]) == 0  # a new run cleans the leftover and completes
        info = "run_info.json" if argv[0] == "merge" else "moecraft_run_info.json"
        assert not tmp.exists() and not (out / MARKER).exists() and (out / info).is_file()
        assert leftovers(tmp_path) == []
    assert fails(capsys, "merge", "--artifact", crafted / "nope", "--out", tmp_path / "m2").startswith(
        "artifact folder not found")


def test_a_failing_merge_overwrite_keeps_the_old_output(capsys, tmp_path, base_and_run, monkeypatch):
    _, run = base_and_run
    out = tmp_path / "merged"
    out.mkdir()
    (out / "old.txt").write_text("old result\n")
    assert fails(capsys, "merge", "--artifact", run, "--out", out) == \
        f"--out {out} is not empty; use --overwrite to replace it"

    def broken(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    from transformers import PreTrainedModel

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", broken)  # a full disk while writing the weights
    with pytest.raises(OSError):
        main(["merge", "--artifact", str(run), "--out", str(out), "--overwrite"])
    assert snapshot(out) == {"old.txt": hashlib.sha256(b"old result\n").hexdigest()} and leftovers(tmp_path) == []
    monkeypatch.undo()
    assert main(["merge", "--artifact", str(run), "--out", str(out), "--overwrite"]) == 0
    assert not (out / "old.txt").exists() and (out / "config.json").is_file() and leftovers(tmp_path) == []


# ----------------------------------------------------------------------------- every command: inputs
def test_every_command_refuses_an_output_around_its_inputs(capsys, tmp_path):
    data = _data(tmp_path / "d" / "data.jsonl")
    scores = tmp_path / "s" / "scores.json"
    write_json(scores, {"format": "not checked before the output"})
    model = tmp_path / "m"
    model.mkdir()
    cases = [
        (["score", "--data", data, "--out", data], f"--out {data} is the input {data}"),
        (["select", "--scores", scores, "--out", scores], f"--out {scores} is the input {scores}"),
        (["analyze", "--scores", f"a={scores}", "--out", scores.parent], f"--out {scores.parent} contains the input {scores}"),
        (["eval", "--tasks", data, "--out", data.parent], f"--out {data.parent} contains the input {data}"),
        (["eval", "--model", model, "--out", model / "ev"], f"--out {model / 'ev'} is inside the input {model}"),
        (["craft", "--model", model, "--output", model], f"--output {model} is the input {model}"),
        (["demo", "--data", data, "--out", data.parent], f"--out {data.parent} contains the input {data}"),
        (["train", "--model", "tiny:mixtral", "--data", "builtin:intent", "--mix-data", data, "--out", tmp_path],
         f"--out {tmp_path} contains the input {data}"),
    ]
    before = snapshot(tmp_path)
    with pytest.MonkeyPatch.context() as mp:  # a folder written whole and renamed cannot be the working folder
        mp.chdir(model)
        assert fails(capsys, "analyze", "--scores", scores, "--out", ".", "--overwrite") == \
            "--out . is or contains the current working folder; give another folder"
    for argv, want in cases:
        assert fails(capsys, *argv, "--overwrite") == f"{want}; write the output somewhere else"
    assert snapshot(tmp_path) == before


# ----------------------------------------------------------------------------- modes
@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_written_files_and_folders_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        assert main(["craft", "--model", "tiny:llama", "--output", str(tmp_path / "crafted"), "--num-experts", "2",
                     "--adapter-dim", "4", "--quantize", "none"]) == 0
        assert main(["export", "--artifact", str(tmp_path / "crafted"), "--output", str(tmp_path / "exported")]) == 0
        train(_train_cfg(tmp_path / "run", max_steps=1, save_every=1))
        write_json(tmp_path / "sub" / "x.json", {"a": 1})
    finally:
        os.umask(old)
    paths = [tmp_path / "crafted", tmp_path / "exported", tmp_path / "run", tmp_path / "sub"]
    seen = set()
    for root in paths:
        for p in [root, *root.rglob("*")]:
            mode = stat.S_IMODE(p.stat().st_mode)
            assert mode == (0o777 if p.is_dir() else 0o666) & ~umask, (p, oct(mode))
            seen.add(p.suffix)
    assert ".safetensors" in seen and ".json" in seen  # safetensors alone would write 0600


def test_lock_is_exclusive_between_threads_and_released(tmp_path):
    import threading

    target = tmp_path / "x"
    got = []
    with output_lock(target):
        t = threading.Thread(target=lambda: got.append(_try_lock(target)))
        t.start()
        t.join()
    assert got == [False]
    assert _try_lock(target) and leftovers(tmp_path) == []


def _try_lock(target) -> bool:
    try:
        with output_lock(target):
            time.sleep(0)
        return True
    except MoecraftError:
        return False


def test_overwrite_through_a_symlink_replaces_the_real_folder_and_stale_siblings_are_handled(tmp_path):
    from moecraft.files import output_folder

    real = tmp_path / "real"
    real.mkdir()
    (real / "old.txt").write_text("old\n")
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    with output_folder(link, overwrite=True) as tmp:
        assert tmp.parent == tmp_path and (tmp / MARKER).exists()
        (tmp / "new.txt").write_text("new\n")
    assert link.is_symlink() and sorted(os.listdir(real)) == ["new.txt"] and leftovers(tmp_path) == []
    # a run killed between its two renames left the old output aside and none in place: the next run puts it back
    # (and so refuses to write over it), and removes the temporary folder of a killed run
    os.replace(real, tmp_path / ".real.moecraft-old-1")
    (tmp_path / ".real.moecraft-tmp-2").mkdir()
    with pytest.raises(MoecraftError, match="is not empty; use --overwrite"), output_folder(real):
        pass
    assert sorted(os.listdir(real)) == ["new.txt"] and leftovers(tmp_path) == []


def test_prediction_names_are_distinct_also_on_case_insensitive_file_systems():
    from moecraft.eval.runner import prediction_names

    def digest(s):
        return hashlib.sha256(s.encode()).hexdigest()[:8]

    names = prediction_names(["a/eval.jsonl", "b/Eval.jsonl", "builtin:intent"])
    assert names == {"a/eval.jsonl": f"predictions-eval-{digest('a/eval.jsonl')}.jsonl",
                     "b/Eval.jsonl": f"predictions-Eval-{digest('b/Eval.jsonl')}.jsonl",
                     "builtin:intent": "predictions-builtin_intent.jsonl"}
    # a third task named like a hashed one: every task gets its index instead
    tricky = ["a/x.jsonl", "b/x.jsonl", f"c/x-{digest('a/x.jsonl')}.jsonl"]
    assert list(prediction_names(tricky).values()) == [
        "predictions-0-x.jsonl", "predictions-1-x.jsonl", f"predictions-2-x-{digest('a/x.jsonl')}.jsonl"]
