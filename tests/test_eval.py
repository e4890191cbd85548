"""Generation, perplexity, task loading, scoring, the eval command and the lm-eval bridge on tiny models."""

import json
import math

import pytest
import torch

from moecraft.errors import DataError
from moecraft.eval.code_exec import sandbox_status
from moecraft.eval.generation import cut_at_stop, generate_texts
from moecraft.eval.perplexity import perplexity
from moecraft.eval.runner import EvalConfig, format_table, run_eval, score_items
from moecraft.eval.tasks import EvalItem, infer_metrics, load_items
from moecraft.models import load_model


@pytest.fixture(scope="module")
def llama():
    return load_model("tiny:llama", seed=3)


def _greedy_reference(model, tok, prompt, n):
    """Plain greedy loop: full forward each step, no cache, no padding, stop at EOS."""
    ids = tok(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    out = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(ids).logits[0, -1].argmax())
            if nxt == tok.eos_token_id:
                break
            out.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return tok.decode(out, skip_special_tokens=True)


def test_batched_left_padded_generation_matches_plain_greedy(llama):
    model, tok = llama
    prompts = ["<|bos|>User: hi\n\nAssistant:", "<|bos|>a much longer prompt with many more bytes in it", "xyz"]
    got = generate_texts(model, tok, prompts, max_new_tokens=12, batch_size=3, progress=False)
    assert got == [_greedy_reference(model, tok, p, 12) for p in prompts]
    assert tok.padding_side == "right" or tok.padding_side == "left"  # restored, whatever it was


def test_cut_at_stop():
    assert cut_at_stop("ans\n\nUser: more", ["\n\nUser:"]) == "ans"
    assert cut_at_stop("a#b$c", ["$", "#"]) == "a"
    assert cut_at_stop("abc", []) == "abc"


def test_perplexity_is_token_weighted_and_matches_model_loss(llama):
    model, tok = llama
    texts = ["short one", "a noticeably longer held-out document about nothing in particular"]
    want_sum, want_n = 0.0, 0
    for t in texts:  # reference: the model's own mean loss per document, weighted by its token count
        ids = tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        with torch.no_grad():
            loss = model(torch.tensor([ids]), labels=torch.tensor([ids])).loss.double().item()
        want_sum += loss * (len(ids) - 1)
        want_n += len(ids) - 1
    got = perplexity(model, tok, [{"text": t} for t in texts], seq_len=512, batch_size=2, progress=False)
    assert got["n_tokens"] == want_n
    assert got["nll"] == pytest.approx(want_sum / want_n, rel=1e-5)
    assert got["ppl"] == pytest.approx(math.exp(want_sum / want_n), rel=1e-5)


def test_load_items_shapes(tmp_path, llama):
    _, tok = llama
    path = tmp_path / "mixed.jsonl"
    rows = [
        {"idx": 0, "prompt": "User: q\n\nAssistant:", "raw_answers": ["a"], "answers": ["a"]},
        {"prompt": "2+2=", "reference": "4"},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    items = load_items(str(path), tok)
    assert items[0].prompt == "User: q\n\nAssistant:" and items[0].references == ["a"]  # raw few-shot text
    assert items[1].references == ["4"]
    assert items[2].prompt == "<|bos|>User: hi\n\nAssistant:" and items[2].references == ["yo"]
    wrapped = load_items(str(path), tok, chat_template=True)[1].prompt
    assert wrapped == "<|bos|>User: 2+2=\n\nAssistant:"
    builtin = load_items("builtin:arithmetic", tok, limit=3)  # the eval split by default
    assert len(builtin) == 3 and builtin[0].references[0].lstrip("-").isdigit()
    assert infer_metrics("builtin:arithmetic", builtin) == ["numeric"]
    path.write_text('{"prompt": "x", "reference": "y"}\n{"prompt": "no reference"}\n')
    with pytest.raises(DataError, match=r"mixed.jsonl:2"):
        load_items(str(path), tok)
    path.write_text('{"prompt": "x", "reference": "y"}\nnot json\n')
    with pytest.raises(DataError, match=r"mixed.jsonl:2: not valid JSON"):
        load_items(str(path), tok)


def test_infer_metrics_from_references():
    mk = lambda refs, rec=None: [EvalItem("p", [r], rec or {}) for r in refs]  # noqa: E731
    assert infer_metrics("x.jsonl", mk(['{"intent": "a", "slots": {}}'])) == ["intent_json", "intent_label"]
    assert infer_metrics("x.jsonl", mk(["1 + 1\n#### 2", "7"])) == ["numeric"]
    assert infer_metrics("x.jsonl", mk(["Paris"])) == ["exact_match"]
    assert infer_metrics("x.jsonl", mk(["", ""], {"test": "assert True"})) == ["code_pass@1"]


def test_score_items_hand_worked():
    items = [EvalItem("p", ["#### 4"], {}), EvalItem("p", ["10"], {}), EvalItem("p", ["3"], {})]
    summary, per = score_items(items, ["2+2=4", "#### 11", "3"], ["numeric", "exact_match"])
    assert summary["numeric"] == pytest.approx(200 / 3)
    assert summary["exact_match"] == pytest.approx(100 / 3)
    assert per[1] == {"numeric": 0.0, "exact_match": 0.0}
    code = [EvalItem("p", [], {"test_list": ["assert f() == 1"]})] * 2
    # our own trusted programs: where no sandbox exists they may run on the host (the explicit opt-out)
    unsafe = sandbox_status().startswith("none")
    s, _ = score_items(code, ["def f():\n    return 1", "def f():\n    while True: pass"], ["code_pass@1"], code_timeout=1,
                       unsafe_code_exec=unsafe)
    assert s["code_pass@1"] == pytest.approx(50.0)


def test_eval_command_end_to_end(tmp_path):
    from moecraft.cli import main

    out = tmp_path / "ev"
    rc = main(["eval", "--model", "tiny:llama", "--tasks", "builtin:intent,builtin:arithmetic", "--limit", "3",
               "--max-new-tokens", "6", "--out", str(out), "--perplexity-data", "builtin:arithmetic:eval",
               "--perplexity-limit", "4"])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert set(res["tasks"]) == {"builtin:intent", "builtin:arithmetic"}
    assert res["tasks"]["builtin:intent"]["n"] == 3 and "intent_json" in res["tasks"]["builtin:intent"]["metrics"]
    assert res["perplexity"]["ppl"] > 1
    assert len((out / "predictions-builtin_arithmetic.jsonl").read_text().splitlines()) == 3
    assert json.loads((out / "run_info.json").read_text())["config"]["limit"] == 3
    assert "builtin:arithmetic" in format_table(res)
    assert main(["eval", "--model", "tiny:llama", "--tasks", str(tmp_path / "missing.jsonl")]) == 2
    with pytest.raises(DataError):
        run_eval(EvalConfig(model="tiny:llama", tasks=[str(tmp_path / "missing.jsonl")], out=tmp_path, overwrite=True))


def test_lm_eval_bridge_on_a_local_task(tmp_path, llama):
    pytest.importorskip("lm_eval", reason="lm_eval is absent: pip install 'moecraft[lm-eval]' to test the bridge")
    from moecraft.eval.lm_eval_bridge import run_lm_eval

    model, tok = llama
    docs = [{"q": f"{a} plus {b} is", "choices": [str(a + b), str(a * b + 7), "no"], "label": i % 3}
            for i, (a, b) in enumerate([(1, 2), (3, 4), (5, 6), (2, 2), (7, 1), (9, 9)])]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(d) for d in docs) + "\n")
    (tmp_path / "tiny_mc.yaml").write_text(
        "task: moecraft_tiny_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {tmp_path / 'd.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{q}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: label\nmetric_list:\n  - metric: acc\n'
    )
    got = run_lm_eval(model, tok, ["moecraft_tiny_mc"], include_path=str(tmp_path), batch_size=4)

    def loglik(ctx, cont):  # reference: sum of log-probs of the continuation tokens after the context
        c = tok(ctx, add_special_tokens=False)["input_ids"]
        x = tok(cont, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([c + x])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0].double(), -1)
        return sum(float(logp[len(c) - 1 + j, t]) for j, t in enumerate(x))

    want = sum(max(range(3), key=lambda k: loglik(d["q"], " " + d["choices"][k])) == d["label"] for d in docs)
    assert got["moecraft_tiny_mc"]["acc"] == pytest.approx(want / len(docs))
