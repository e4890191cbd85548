"""Task data files for the experiments, derived deterministically from the ESFT data, moecraft's built-in
arithmetic task and the pretraining corpus (written under ``<out>/data``, described in ``manifest.json``).

- ``intent``: the ESFT paper's text-to-JSON intent task (Chinese). Training rows as they are; a seeded 5% of
  them held out as validation (learning-rate choice); the test set is the paper's 500 evaluation rows, asked
  zero-shot in the training format (the last request of each 16-shot prompt, same reference answers): a
  50M-parameter model trained on 1024-token windows cannot use a 1000-token few-shot prompt.
- ``arithmetic``: ``builtin:arithmetic`` train rows (5% validation); test = ``builtin:arithmetic:eval``.
- training files repeat the training rows (a fresh seeded order per pass) until they hold the tokens that
  ``steps x batch x seq_len`` needs: moecraft samples each data set once, so with ``--mix-data`` a short
  task file would otherwise shrink the task's share far below ``--mix-ratio``;
- ``align``: pretraining-corpus text, the stand-in for the paper's alignment data (mixed 1:1 in training);
- ``pesc-mix``: the PESC instruction mix, an equal token share of every task;
- ``probe/<task>-a|b``: two disjoint halves of each task's training data for the expert-overlap probe.
"""

from __future__ import annotations

import math
import random

from replicate.common import (
    ESFT_DATA,
    TASKS,
    Layout,
    Scale,
    domains,
    read_json,
    read_jsonl,
    sha256_file,
    write_json,
    write_jsonl,
)

VAL_SHARE = 0.05


def n_tokens(records: list[dict], tokenizer) -> int:
    from moecraft.data import render_example

    return sum(len(render_example(r, tokenizer)[0]) for r in records)


def take_tokens(records: list[dict], need: float, tokenizer) -> tuple[list[dict], int]:
    """The leading records that together hold at least ``need`` tokens (all of them if they hold fewer)."""
    out, got = [], 0
    for r in records:
        if got >= need:
            break
        out.append(r)
        got += n_tokens([r], tokenizer)
    return out, got


def repeat_to(records: list[dict], tokens_needed: int, tokens_per_pass: int, seed: int) -> tuple[list[dict], int]:
    """Passes over ``records`` (each in a new seeded order) until ``tokens_needed`` are covered."""
    passes = max(1, math.ceil(tokens_needed / max(1, tokens_per_pass)))
    out = []
    for k in range(passes):
        order = list(range(len(records)))
        random.Random(seed + k).shuffle(order)
        out += [records[i] for i in order]
    return out, passes


def split_val(records: list[dict], seed: int) -> tuple[list[dict], list[dict]]:
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(records) * VAL_SHARE))
    return [records[i] for i in order[n_val:]], [records[i] for i in order[:n_val]]


def zero_shot_intent(row: dict) -> dict:
    """The final request of a few-shot ESFT eval prompt as one user turn, with the row's answers."""
    body = row["prompt"].removeprefix("User: ").removesuffix("\n\nAssistant:")
    return {"messages": [{"role": "user", "content": body.split("\n\n")[-1]}], "reference": row["answers"],
            "idx": row["idx"]}


def halves(records: list[dict], seed: int) -> tuple[list[dict], list[dict]]:
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    return [records[i] for i in order[0::2]], [records[i] for i in order[1::2]]


def prepare(layout: Layout, scale: Scale, tokenizer) -> dict:
    """Write every data file once; returns the manifest (task -> files, tokens, passes, max_new_tokens)."""
    from moecraft.builtin_data import generate

    manifest_path = layout.data / "manifest.json"
    if manifest_path.is_file():
        return read_json(manifest_path)
    for name in ("train-intent.jsonl", "eval-intent.jsonl", "train-law.jsonl"):
        if not (ESFT_DATA / name).is_file():
            raise SystemExit(f"ESFT task data not found: {ESFT_DATA / name} (set REPLICATE_ESFT_DATA)")
    d = layout.data
    limit = scale.max_task_records
    raw = {"intent": read_jsonl(ESFT_DATA / "train-intent.jsonl")[:limit],
           "arithmetic": generate("arithmetic", "train")[:limit]}
    tests = {"intent": layout.rel(write_jsonl(d / "intent.test.jsonl", [
        zero_shot_intent(r) for r in read_jsonl(ESFT_DATA / "eval-intent.jsonl")])),
        "arithmetic": "builtin:arithmetic:eval"}
    per_step = scale.steps * scale.batch_size * scale.seq_len
    manifest: dict = {"tasks": {}, "val_share": VAL_SHARE}
    trains = {}
    for i, task in enumerate(TASKS):
        train, val = split_val(raw[task], seed=i)
        per_pass = n_tokens(train, tokenizer)
        rows, passes = repeat_to(train, math.ceil(per_step * (1 - scale.mix_ratio) * 1.05), per_pass, seed=100 + i)
        answers = [len(tokenizer(r["messages"][-1]["content"], add_special_tokens=False)["input_ids"]) for r in train]
        trains[task] = (train, per_pass)
        manifest["tasks"][task] = {
            "train": layout.rel(write_jsonl(d / f"{task}.train.jsonl", rows)),
            "val": layout.rel(write_jsonl(d / f"{task}.val.jsonl", val)), "test": tests[task],
            "unique_train_records": len(train), "val_records": len(val), "tokens_per_pass": per_pass,
            "passes": passes, "max_new_tokens": min(scale.max_new_tokens_cap, max(answers) + 8)}
    # PESC instruction mix: an equal token share per task, enough for steps x batch x seq_len
    mix: list[dict] = []
    for i, task in enumerate(TASKS):
        train, per_pass = trains[task]
        rows, passes = repeat_to(train, math.ceil(per_step * 1.05 / len(TASKS)), per_pass, seed=200 + i)
        mix += rows
        manifest["tasks"][task]["pesc_mix_passes"] = passes
    random.Random(3).shuffle(mix)
    manifest["pesc_mix"] = {"train": layout.rel(write_jsonl(d / "pesc-mix.train.jsonl", mix)),
                            "val": layout.rel(write_jsonl(d / "pesc-mix.val.jsonl", [
                                r for t in TASKS for r in read_jsonl(layout.root / manifest["tasks"][t]["val"])]))}
    # alignment stand-in: pretraining text (train split only), enough tokens for the mixed-in share
    corpus = {dom: [{"text": r["text"], "source": r["source"]} for r in read_jsonl(layout.corpus / f"{dom}.train.jsonl")]
              for dom in domains(layout)}
    mixed = [r for rows in corpus.values() for r in rows]
    random.Random(4).shuffle(mixed)
    align, got = take_tokens(mixed, per_step * scale.mix_ratio * 1.1, tokenizer)
    manifest["align"] = {"file": layout.rel(write_jsonl(d / "align.jsonl", align)), "records": len(align),
                         "tokens": got}
    # probe: two disjoint halves per task, each with (at most a little more than) the tokens scoring samples
    probe_src = {"intent": raw["intent"], "law": read_jsonl(ESFT_DATA / "train-law.jsonl")[:limit],
                 "arithmetic": raw["arithmetic"], **corpus}
    manifest["probe"] = {}
    for i, (task, recs) in enumerate(probe_src.items()):
        files = []
        for h, rows in zip("ab", halves(recs, seed=300 + i)):
            rows, _ = take_tokens(rows, scale.score_sequences * scale.seq_len * 1.2, tokenizer)
            files.append(layout.rel(write_jsonl(d / "probe" / f"{task}-{h}.jsonl", rows)))
        manifest["probe"][task] = files
    manifest["sha256"] = {layout.rel(p): sha256_file(p) for p in sorted(d.rglob("*.jsonl"))}
    write_json(manifest_path, manifest)
    return manifest

