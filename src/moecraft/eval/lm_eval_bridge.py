"""Bridge to lm-evaluation-harness (optional extra ``lm-eval``): MMLU, GSM8K, ARC, ... on a loaded model.

The in-memory model (base, or with a moecraft artifact applied) is wrapped in lm-eval's ``HFLM``, so a
tuned model is scored without saving a merged copy first. Task names are lm-eval's; extra local task
YAMLs can be added with ``include_path``.
"""

from __future__ import annotations

from moecraft.errors import MoecraftError
from moecraft.eval.metrics import require


def run_lm_eval(
    model, tokenizer, tasks: list[str], limit: int | float | None = None, include_path: str | None = None,
    batch_size: int = 8, num_fewshot: int | None = None,
) -> dict[str, dict]:
    """``{task: {metric: value}}`` from ``lm_eval.simple_evaluate`` (``"acc,none"`` -> ``"acc"``)."""
    lm_eval = require("lm_eval", "lm-eval")
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    device = str(next(model.parameters()).device)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
    manager = TaskManager(include_path=include_path) if include_path else TaskManager()
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise MoecraftError(f"unknown lm-eval task(s) {unknown}; see `lm_eval ls tasks` (or pass --lm-eval-include-path)")
    out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), limit=limit, task_manager=manager,
                                  num_fewshot=num_fewshot, log_samples=False, bootstrap_iters=0)
    if out is None:  # non-zero ranks in distributed runs
        return {}
    return {
        task: {k.split(",")[0]: v for k, v in vals.items() if isinstance(v, (int, float)) and "stderr" not in k and k != "sample_len"}
        for task, vals in out["results"].items()
    }
