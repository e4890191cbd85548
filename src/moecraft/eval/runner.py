"""``moecraft eval``: generate on task files, score with the task metrics, and measure general ability."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from moecraft.config import MAY_BE_EMPTY, SEED, checked, device_name, dtype_name
from moecraft.data.records import DataFormatName, data_option
from moecraft.errors import MoecraftError
from moecraft.eval import metrics as M
from moecraft.eval.tasks import EvalItem, infer_metrics, load_items


def _something_to_evaluate(cfg: EvalConfig) -> None:
    if not (cfg.tasks or cfg.perplexity_data or cfg.lm_eval_tasks):
        raise MoecraftError("nothing to evaluate: give --tasks, --perplexity-data or --lm-eval-tasks")


@dataclass
@checked(
    _something_to_evaluate, limit=">= 0", max_new_tokens=">= 1", batch_size=">= 1", temperature=">= 0",
    stop=MAY_BE_EMPTY, code_timeout="(0, 86400]", perplexity_limit=">= 0", seq_len=">= 2", lm_eval_limit=">= 1",
    seed=SEED, dtype=dtype_name, device=device_name,
)
class EvalConfig:
    """Options of ``moecraft eval``."""

    model: str = field(default="tiny:deepseek_v2", metadata={"help": "hub id, local folder, or tiny:<family>"})
    adapter: str | None = field(
        default=None, metadata={"help": "folder of a trained moecraft artifact (ESFT experts, LoRA, PESC) to load onto --model"})
    tasks: list[str] = field(
        default_factory=lambda: ["builtin:intent"],
        metadata={"help": "eval sources: JSONL files (chat, ESFT eval, prompt/reference, code rows) or builtin:<task>[:split]"})
    metrics: list[str] = field(
        default_factory=list,
        metadata={"help": f"metrics for every task (empty: chosen per task); any of {list(M.ALL_METRICS)}"})
    out: Path = field(default=Path("runs/eval"), metadata={"help": "output folder (results.json, predictions)"})
    overwrite: bool = field(default=False, metadata={"help": "replace a non-empty --out (once the new one is complete)"})
    limit: int | None = field(default=None, metadata={"help": "evaluate at most this many rows per task"})
    max_new_tokens: int = field(default=128, metadata={"help": "tokens to generate per prompt"})
    batch_size: int = field(default=8, metadata={"help": "prompts per generation batch (left padded)"})
    temperature: float = field(default=0.0, metadata={"help": "0 = greedy decoding"})
    stop: list[str] = field(
        default_factory=lambda: ["\n\nUser:"],
        metadata={"help": "cut generations at these strings (few-shot prompts go on with the next turn)"})
    chat_template: bool = field(
        default=False, metadata={"help": "wrap raw 'prompt' rows as a user turn of the chat template"})
    chat_template_kwargs: str | None = field(default=None, metadata={
        "help": 'JSON object of chat template options for the prompts, e.g. \'{"enable_thinking": false}\''})
    code_timeout: float = field(default=10.0, metadata={"help": "seconds per program for code_pass@1"})
    unsafe_code_exec: bool = field(
        default=False, metadata={"help": "let code_pass@1 run model-written code on the host when no sandbox "
                                         "(bubblewrap) is available; without it moecraft refuses"})
    perplexity_data: str | None = field(
        default=None, metadata={"help": "held-out general corpus for perplexity (JSONL/datasets/hub/builtin)"})
    perplexity_limit: int | None = field(default=200, metadata={"help": "records of the perplexity corpus to use"})
    # --- data format (moecraft.data.records.DataOptions; the same on score, train, eval, demo, data)
    data_format: DataFormatName = data_option("data_format")
    field_messages: str | None = data_option("field_messages")
    message_property_mappings: dict | None = data_option("message_property_mappings")
    data_columns: dict | None = data_option("data_columns")
    roles: dict | None = data_option("roles")
    roles_to_train: list[str] | None = data_option("roles_to_train")
    seq_len: int = field(default=1024, metadata={"help": "window length for perplexity"})
    lm_eval_tasks: list[str] = field(
        default_factory=list, metadata={"help": "lm-evaluation-harness tasks (e.g. mmlu,gsm8k,arc_challenge); needs the lm-eval extra"})
    lm_eval_limit: int | None = field(default=None, metadata={"help": "examples per lm-eval task"})
    lm_eval_include_path: str | None = field(default=None, metadata={"help": "folder of extra lm-eval task YAMLs"})
    judge: str | None = field(
        default=None, metadata={"help": "LLM judge as module:function (prompt -> reply); adds the 'judge' metric"})
    judge_rubric: str | None = field(
        default=None, metadata={"help": "rubric template file with {question}, {prediction}, {reference}"})
    seed: int = field(default=0, metadata={"help": "random seed"})
    dtype: str = field(default="auto", metadata={"help": "model dtype: auto, bfloat16, float32, ..."})
    device: str = field(default="auto", metadata={"help": "auto (cuda if available), cpu, cuda, ..."})


def check_metrics(metrics: list[str], have_judge: bool) -> None:
    """Unknown metric names, or 'judge' without a judge function, are a MoecraftError."""
    unknown = [m for m in metrics if m not in M.ALL_METRICS]
    if unknown:
        raise MoecraftError(f"unknown metric(s) {unknown}; choose from {list(M.ALL_METRICS)}")
    if "judge" in metrics and not have_judge:
        raise MoecraftError("metric 'judge' needs --judge module:function")


def score_items(
    items: list[EvalItem], predictions: list[str], metrics: list[str], code_timeout: float = 10.0,
    judge=None, rubric: str | None = None, unsafe_code_exec: bool = False,
) -> tuple[dict[str, float], list[dict[str, float | None]]]:
    """Task-level scores (0-100) and per-example scores (0/1 or [0, 1]) for each metric."""
    check_metrics(metrics, judge is not None)
    per_ex: list[dict[str, float | None]] = [{} for _ in items]
    summary: dict[str, float] = {}
    refs = [it.references for it in items]
    for name in metrics:
        if name in M.EXAMPLE_METRICS:
            vals = [M.score_example(name, p, r) for p, r in zip(predictions, refs)]
        elif name in M.CORPUS_METRICS:
            summary[name] = M.CORPUS_METRICS[name](predictions, refs)
            continue
        elif name == "code_pass@1":
            from tqdm.auto import tqdm

            from moecraft.eval.code_exec import build_program, run_python

            vals = [
                float(run_python(build_program(it.record, p), timeout=code_timeout, unsafe=unsafe_code_exec).passed)
                for it, p in tqdm(list(zip(items, predictions)), desc="run tests", unit="program")
            ]
        else:  # judge
            if judge is None:
                raise MoecraftError("metric 'judge' needs --judge module:function")
            from moecraft.eval.judge import DEFAULT_RUBRIC, judge_scores

            vals = judge_scores(judge, rubric or DEFAULT_RUBRIC, [it.prompt for it in items], predictions,
                                [r[0] if r else "" for r in refs])
        for d, v in zip(per_ex, vals):
            d[name] = v
        scored = [v for v in vals if v is not None]
        summary[name] = 100.0 * sum(scored) / len(scored) if scored else float("nan")
    return summary, per_ex


def evaluate_model(model, tokenizer, cfg: EvalConfig, out: Path | None = None, progress: bool = True) -> dict:
    """Run every task (and perplexity / lm-eval when asked) on an already loaded model.

    Returns ``{"tasks": {source: {"metrics": {...}, "n": int}}, "perplexity": {...}?, "lm_eval": {...}?}``;
    with ``out`` set, each task's predictions go to ``out/predictions-<task>.jsonl`` (a short hash of the
    source is added when two tasks share a name), named in the task's ``"predictions"`` entry.
    """
    judge = rubric = None
    if cfg.judge:
        from moecraft.eval.judge import load_judge, load_rubric

        judge, rubric = load_judge(cfg.judge), load_rubric(cfg.judge_rubric)
    from moecraft.eval.generation import check_prompt_lengths, generate_texts

    # Read and check every input before generating anything: a bad second task or perplexity file must not
    # fail after minutes of generation, with half of the predictions written.
    names = prediction_names(list(cfg.tasks))
    if cfg.perplexity_data:
        from moecraft.models import check_sequence_length

        check_sequence_length(model, cfg.seq_len)
    tasks = []
    for source in cfg.tasks:
        from moecraft.data import DataOptions
        from moecraft.data.render import template_options

        items = load_items(source, tokenizer, cfg.limit, cfg.chat_template, DataOptions.from_config(cfg),
                           template_options(cfg.chat_template_kwargs))
        metrics = list(cfg.metrics) or infer_metrics(source, items)
        if judge is not None and "judge" not in metrics:
            metrics.append("judge")
        check_metrics(metrics, judge is not None)
        if items:
            lengths = [len(ids) for ids in tokenizer([it.prompt for it in items], add_special_tokens=False)["input_ids"]]
            check_prompt_lengths(model, lengths, cfg.max_new_tokens,
                                 [f"{source}: the prompt of row {i + 1}" for i in range(len(items))])
        tasks.append((source, items, metrics))
    if not cfg.unsafe_code_exec and any("code_pass@1" in m for _, _, m in tasks):
        from moecraft.eval.code_exec import require_sandbox

        require_sandbox()  # before generating: model-written code must not run unsandboxed by default
    ppl_records = None
    if cfg.perplexity_data:
        from moecraft.data import DataOptions, load_records

        ppl_records = load_records(cfg.perplexity_data, cfg.perplexity_limit, DataOptions.from_config(cfg))
    results: dict = {"tasks": {}}
    for source, items, metrics in tasks:
        preds = generate_texts(
            model, tokenizer, [it.prompt for it in items], cfg.max_new_tokens, cfg.batch_size, cfg.temperature,
            cfg.stop, cfg.seed, progress, desc=f"generate {source}",
        )
        summary, per_ex = score_items(items, preds, metrics, cfg.code_timeout, judge, rubric, cfg.unsafe_code_exec)
        results["tasks"][source] = {"metrics": summary, "n": len(items)}
        if out is not None:
            from moecraft.files import write_text

            results["tasks"][source]["predictions"] = names[source]
            write_text(out / names[source], "".join(
                json.dumps({"prompt": it.prompt, "prediction": p, "references": it.references, "scores": s},
                           ensure_ascii=False) + "\n" for it, p, s in zip(items, preds, per_ex)))
    if ppl_records is not None:
        from moecraft.eval.perplexity import perplexity

        ppl = perplexity(model, tokenizer, ppl_records, cfg.seq_len, cfg.batch_size, progress)
        results["perplexity"] = {"data": cfg.perplexity_data, **ppl}
    if cfg.lm_eval_tasks:
        from moecraft.eval.lm_eval_bridge import run_lm_eval

        results["lm_eval"] = run_lm_eval(model, tokenizer, cfg.lm_eval_tasks, cfg.lm_eval_limit,
                                         cfg.lm_eval_include_path, cfg.batch_size)
    return results


def _slug(source: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(source).stem if source.endswith(".jsonl") else source).strip("_")


def prediction_names(sources: list[str]) -> dict[str, str]:
    """A distinct predictions file name per task source: ``predictions-<slug>.jsonl``, plus a short hash of
    the source when two sources share a slug (``a/eval.jsonl`` and ``b/eval.jsonl``). A source given twice
    is an error (its results would overwrite each other)."""
    import hashlib
    from collections import Counter

    repeated = sorted(s for s, n in Counter(sources).items() if n > 1)
    if repeated:
        raise MoecraftError(f"task(s) {repeated} given more than once in --tasks")
    slugs = Counter(_slug(s).lower() for s in sources)  # lower: case-insensitive file systems
    names = {}
    for s in sources:
        slug = _slug(s)
        if slugs[slug.lower()] > 1:
            slug += "-" + hashlib.sha256(s.encode()).hexdigest()[:8]
        names[s] = f"predictions-{slug}.jsonl"
    if len({n.lower() for n in names.values()}) < len(names):  # a task literally named like a hashed one
        names = {s: f"predictions-{i}-{_slug(s)}.jsonl" for i, s in enumerate(sources)}
    return names


def format_table(results: dict, title: str | None = None) -> str:
    """Plain-text table: one row per task and metric, then perplexity and lm-eval numbers."""
    rows = [(task, name, f"{val:.2f}", str(r["n"])) for task, r in results["tasks"].items()
            for name, val in r["metrics"].items()]
    if "perplexity" in results:
        p = results["perplexity"]
        rows.append((p["data"], "perplexity", f"{p['ppl']:.3f}", str(p["n_tokens"]) + " tok"))
    for task, vals in results.get("lm_eval", {}).items():
        rows += [(f"lm_eval:{task}", k, f"{v:.4f}", "") for k, v in vals.items() if isinstance(v, (int, float))]
    head = ("task", "metric", "score", "n")
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    line = lambda r: "  ".join(str(x).ljust(w) for x, w in zip(r, widths))  # noqa: E731
    text = [line(head), line(["-" * w for w in widths]), *map(line, rows)]
    return ((title + "\n") if title else "") + "\n".join(text)


def load_for_eval(cfg: EvalConfig):
    """Model and tokenizer of ``cfg.model``, with ``cfg.adapter`` (a trained artifact) applied."""
    from moecraft.esft.stats import resolve_device
    from moecraft.models import load_model

    model, tok = load_model(cfg.model, dtype=cfg.dtype, device=resolve_device(cfg.device), seed=cfg.seed)
    if cfg.adapter:
        from moecraft.artifacts import load_artifact

        model = load_artifact(model, Path(cfg.adapter))
    return model.eval(), tok


def run_eval(cfg: EvalConfig) -> dict:
    """Python API of ``moecraft eval``: results dict, also written to ``cfg.out/results.json``."""
    from moecraft.files import output_folder
    from moecraft.runinfo import seed_everything, write_run_info

    seed_everything(cfg.seed)
    inputs = [cfg.model, cfg.adapter, *cfg.tasks, cfg.perplexity_data, cfg.judge_rubric, cfg.lm_eval_include_path]
    # written into a temporary sibling and renamed when complete (moecraft.files.output_folder)
    with output_folder(cfg.out, inputs=inputs, overwrite=cfg.overwrite) as tmp:
        from moecraft.data import DataOptions
        from moecraft.data.render import early_tokenizer, template_options

        early = early_tokenizer(cfg.model)
        for source in cfg.tasks if early is not None else ():  # bad rows and chat template errors: before the model
            load_items(source, early, cfg.limit, cfg.chat_template, DataOptions.from_config(cfg),
                       template_options(cfg.chat_template_kwargs))
        model, tok = load_for_eval(cfg)
        results = evaluate_model(model, tok, cfg, tmp)
        results["model"], results["adapter"] = cfg.model, cfg.adapter
        (tmp / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
        write_run_info(tmp, cfg)
    return results
