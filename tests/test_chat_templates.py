"""Loss masks with the real chat templates of the supported model families (fixtures in
tests/fixtures/chat_templates, sources in its README): for multi-turn chats the trained tokens are exactly
each assistant turn's output and the template's own end-of-turn token, nothing of a user/system/tool turn.

The tokenizer is the byte-level tokenizer with each model's special tokens added, so a string's tokens are
the same wherever it stands and the expected trained ids can be written as text, independently of the code.
"""

from pathlib import Path

import numpy as np
import pytest

from moecraft.data import render_batch, render_example, sample_sequences
from moecraft.errors import DataError
from moecraft.models import byte_tokenizer

TEMPLATES = Path(__file__).parent / "fixtures" / "chat_templates"

# model -> (template file, bos, eos, other special tokens)
MODELS = {
    "qwen3": ("qwen3.jinja", None, "<|im_end|>", ["<|im_start|>", "<|endoftext|>"]),
    "qwen2_5": ("qwen2_5.jinja", None, "<|im_end|>", ["<|im_start|>", "<|endoftext|>"]),
    "deepseek_v2": ("deepseek_v2_lite_chat.jinja", "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", []),
    "deepseek_v3": ("deepseek_v3.jinja", "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>",
                    ["<｜User｜>", "<｜Assistant｜>"]),
    "mixtral": ("mixtral_8x7b_instruct_v0_1.jinja", "<s>", "</s>", []),
    "mixtral_original": ("mixtral_8x7b_instruct_v0_1_original.jinja", "<s>", "</s>", []),
    "llama3": ("llama3_1_8b_instruct.jinja", "<|begin_of_text|>", "<|eot_id|>",
               ["<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|python_tag|>"]),
    "gemma3": ("gemma3_it.jinja", "<bos>", "<eos>", ["<start_of_turn>", "<end_of_turn>"]),
    "olmoe": ("olmoe_1b_7b_0924_instruct.jinja", "<|endoftext|>", "<|endoftext|>", []),
    "gpt_oss": ("gpt_oss_20b.jinja", "<|startoftext|>", "<|return|>",
                ["<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|call|>", "<|constrain|>"]),
}


def model_tokenizer(model: str):
    name, bos, eos, extra = MODELS[model]
    tok = byte_tokenizer()
    special = {"eos_token": eos, "additional_special_tokens": extra}
    if bos:
        special["bos_token"] = bos
    tok.add_special_tokens(special)
    tok.chat_template = (TEMPLATES / name).read_text(encoding="utf-8")
    return tok


def trained_runs(ids, mask, tok) -> list[str]:
    """The text of every maximal run of trained tokens."""
    runs, cur = [], []
    for i, m in zip(list(ids) + [None], list(mask) + [0]):
        if m:
            cur.append(i)
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    return runs


def check(model: str, messages: list[dict], expected: list[str], **kwargs) -> list[int]:
    tok = model_tokenizer(model)
    rec = {"messages": messages}
    ids, mask = render_example(rec, tok, **kwargs)
    # the ids are the template's rendering, tokenized once; nothing appended
    text = tok.apply_chat_template(messages, tokenize=False, **kwargs)
    assert ids == tok(text, add_special_tokens=False)["input_ids"]
    assert trained_runs(ids, mask, tok) == expected
    # the exact trained ids: the expected texts' own tokens
    assert [i for i, m in zip(ids, mask) if m] == [t for e in expected for t in tok(e, add_special_tokens=False)["input_ids"]]
    batch_ids, batch_mask = render_batch([rec, rec], tok, **kwargs)[1]
    assert batch_ids.tolist() == ids and batch_mask.tolist() == mask
    return ids


SYSTEM = {"role": "system", "content": "You are terse."}
CHAT = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]


@pytest.mark.parametrize("model, expected", [
    ("qwen2_5", ["Hello!<|im_end|>", "4<|im_end|>"]),
    ("deepseek_v2", [" Hello!<｜end▁of▁sentence｜>", " 4<｜end▁of▁sentence｜>"]),
    ("deepseek_v3", ["Hello!<｜end▁of▁sentence｜>", "4<｜end▁of▁sentence｜>"]),
    ("mixtral", [" Hello!</s>", " 4</s>"]),
    ("llama3", ["Hello!<|eot_id|>", "4<|eot_id|>"]),
    ("gemma3", ["Hello!<end_of_turn>", "4<end_of_turn>"]),
    ("olmoe", ["Hello!<|endoftext|>", "4<|endoftext|>"]),
    ("gpt_oss", ["<|channel|>final<|message|>Hello!<|end|>", "<|channel|>final<|message|>4<|return|>"]),
    # Qwen3 always opens the last turn with a (here empty) reasoning block: the model writes it, so it is trained
    ("qwen3", ["Hello!<|im_end|>", "<think>\n\n</think>\n\n4<|im_end|>"]),
])
@pytest.mark.parametrize("system", [False, True])
def test_multi_turn_trains_exactly_the_assistant_turns(model, expected, system):
    check(model, [SYSTEM, *CHAT] if system else CHAT, expected)


def test_qwen3_reasoning_turns():
    msgs = [SYSTEM, {"role": "user", "content": "Hi there"},
            {"role": "assistant", "content": "<think>\nA greeting.\n</think>\n\nHello!"},
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "<think>\nTwo and two.\n</think>\n\n4"}]
    # the template drops the reasoning of the earlier turn; the last keeps it: the mask follows the rendering,
    # and the next user turn is not in it (the bug seen with per-prefix rendering)
    check("qwen3", msgs, ["Hello!<|im_end|>", "<think>\nTwo and two.\n</think>\n\n4<|im_end|>"])
    # reasoning in the separate field the template also reads
    msgs2 = [{**m, "content": m["content"].split("\n\n")[-1], "reasoning_content": "Two and two."}
             if m["role"] == "assistant" else m for m in msgs]
    check("qwen3", msgs2, ["Hello!<|im_end|>", "<think>\nTwo and two.\n</think>\n\n4<|im_end|>"])


def test_qwen3_enable_thinking_false():
    # the generation prompt now holds the empty reasoning block: only the answers are trained
    ids = check("qwen3", [SYSTEM, *CHAT], ["Hello!<|im_end|>", "4<|im_end|>"], enable_thinking=False)
    assert len(ids) > 0


def test_three_turns_and_trimmed_content():
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "  b  "},
            {"role": "user", "content": "c"}, {"role": "assistant", "content": "d\n"},
            {"role": "user", "content": "e"}, {"role": "assistant", "content": "f"}]
    check("llama3", msgs, ["b<|eot_id|>", "d<|eot_id|>", "f<|eot_id|>"])  # Llama 3 trims contents
    check("gemma3", msgs, ["b<end_of_turn>", "d<end_of_turn>", "f<end_of_turn>"])
    check("qwen2_5", msgs, ["  b  <|im_end|>", "d\n<|im_end|>", "f<|im_end|>"])


def test_gpt_oss_reasoning_in_the_last_turn():
    msgs = [*CHAT[:3], {"role": "assistant", "content": "4", "thinking": "Two and two."}]
    check("gpt_oss", msgs, ["<|channel|>final<|message|>Hello!<|end|>",
                            "<|channel|>analysis<|message|>Two and two.<|end|><|start|>assistant<|channel|>final"
                            "<|message|>4<|return|>"])


def test_weight_trains_any_role_and_untrains_assistants():
    msgs = [SYSTEM, {"role": "user", "content": "Hi there", "weight": 1},
            {"role": "assistant", "content": "Hello!", "weight": 0},
            {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    check("qwen2_5", msgs, ["Hi there<|im_end|>", "4<|im_end|>"])
    check("llama3", msgs, ["Hi there<|eot_id|>", "4<|eot_id|>"])
    tok = model_tokenizer("qwen2_5")
    ids, mask = render_example({"messages": [{**m, "weight": 0} for m in msgs]}, tok)
    assert len(ids) and not any(mask)


def test_tool_calls_and_tool_results():
    call = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    msgs = [{"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "content": "sunny"},
            {"role": "assistant", "content": "It is sunny."}]
    tool_text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>'
    check("qwen2_5", msgs, [tool_text, "It is sunny.<|im_end|>"])
    # a record's tools go to the template (Qwen writes them into the system turn)
    tok = model_tokenizer("qwen3")
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    ids, mask = render_example({"messages": CHAT, "tools": tools}, tok)
    assert "get_weather" in tok.decode(ids)
    assert trained_runs(ids, mask, tok) == ["Hello!<|im_end|>", "<think>\n\n</think>\n\n4<|im_end|>"]


def test_many_like_records_share_one_skeleton_and_stay_exact():
    tok = model_tokenizer("llama3")
    recs = [{"messages": [{"role": "user", "content": f"q{i} " * (i % 3 + 1)},
                          {"role": "assistant", "content": f" answer {i}" + " x" * (i % 4)}]} for i in range(40)]
    for rec, (ids, mask) in zip(recs, render_batch(recs, tok)):
        assert trained_runs(ids, mask, tok) == [rec["messages"][1]["content"].strip() + "<|eot_id|>"]


def test_template_errors_are_one_line_data_errors():
    tok = model_tokenizer("mixtral_original")
    # the original Mixtral template has no system turn: jinja's TemplateError becomes a DataError naming the record
    with pytest.raises(DataError, match=r"^record 1: the chat template rejects this conversation \(roles: system, "
                                        r"user, assistant, user, assistant\): Conversation roles must alternate"):
        render_batch([{"messages": [SYSTEM, *CHAT]}], tok)
    check("mixtral_original", CHAT, ["Hello!</s>", "4</s>"])
    with pytest.raises(DataError, match=r"^d.jsonl: record 2: the chat template rejects"):
        sample_sequences([{"messages": CHAT}, {"messages": [SYSTEM, *CHAT]}], tok, 4, 64, seed=0, source="d.jsonl")


def test_pair_and_text_records_keep_their_eos():
    tok = model_tokenizer("qwen3")
    ids, mask = render_example({"prompt": "2+2=", "response": "4"}, tok)
    assert trained_runs(ids, mask, tok) == ["4<|im_end|>"]
    ids, mask = render_example({"text": "plain"}, tok)
    assert tok.decode(ids) == "plain<|im_end|>" and all(mask)


def test_mask_follows_offsets_with_merging_tokens():
    """A BPE tokenizer whose merges cross the prompt/response boundary (``]`` + space): the ids are the
    tokenizer's own tokenization of the whole text, and a token holding any trained character is trained."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    merges = [("Ġ", "H"), ("ĠH", "e"), ("l", "l"), ("ĠHe", "ll"), ("]", "Ġ")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    t = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    t.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=t)
    tok.add_special_tokens({"eos_token": "</s>", "bos_token": "<s>"})
    tok.chat_template = (TEMPLATES / "mixtral_8x7b_instruct_v0_1.jinja").read_text()
    ids, mask = render_example({"messages": CHAT}, tok)
    assert ids == tok(tok.apply_chat_template(CHAT, tokenize=False), add_special_tokens=False)["input_ids"]
    # " Hello" merges into "ĠHell" first; in the second turn "]" and " " merge into one token, which is trained
    assert trained_runs(ids, mask, tok) == [" Hello!</s>", "] 4</s>"]
    assert vocab["]Ġ"] in np.asarray(ids)[np.asarray(mask, bool)]


@pytest.mark.parametrize("template, message", [
    # content written twice: which copy is the turn?
    ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}|{{ m['content'] }}</s>{% endfor %}",
     r"^record 1: the chat template renders messages\[1\] \(assistant\) 2 times"),
    # what follows a message depends on its content (its length here)
    ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}{{ messages[1]['content'] | length }}",
     r"^record 1: the chat template renders what follows messages\[1\] \(assistant\) differently"),
])
def test_templates_whose_masks_cannot_be_proven_are_errors(template, message):
    tok = model_tokenizer("mixtral")
    tok.chat_template = template
    with pytest.raises(DataError, match=message):
        render_batch([{"messages": CHAT[:2]}], tok)


def test_sentinel_text_in_content_and_missing_template():
    tok = model_tokenizer("qwen2_5")
    with pytest.raises(DataError, match=r"^record 1: a message contains moecraft's sentinel text"):
        render_batch([{"messages": [CHAT[0], {"role": "assistant", "content": "@@MOECRAFT1@@"}]}], tok)
    tok.chat_template = None
    with pytest.raises(DataError, match=r"^record 1: cannot apply the chat template: "):
        render_batch([{"messages": CHAT}], tok)


def test_template_options_reach_the_training_data(tmp_path):
    import json

    from moecraft.train.config import TrainConfig
    from moecraft.train.loop import build_data

    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": [SYSTEM, *CHAT]}) + "\n" for _ in range(4)))
    tok = model_tokenizer("qwen3")
    runs = {}
    for options in (None, '{"enable_thinking": false}', "{'enable_thinking': False}"):  # JSON, or a YAML mapping
        cfg = TrainConfig(model="tiny:qwen3_moe", data=str(data), eval_data=str(data), out=str(tmp_path / "o"),
                          seq_len=128, max_steps=1, eval_sequences=1, chat_template_kwargs=options)
        _, evals = build_data(cfg, tok)
        runs[options] = trained_runs(*evals[0], tok)
    assert "<think>\n\n</think>\n\n4<|im_end|>" in runs[None]
    assert "4<|im_end|>" in runs['{"enable_thinking": false}'] and not any("think" in r for r in runs[
        '{"enable_thinking": false}'])
    assert runs['{"enable_thinking": false}'] == runs["{'enable_thinking': False}"]


def test_template_options_reach_eval_and_generate_prompts(tmp_path):
    """eval and generate render their prompts with the same renderer and --chat-template-kwargs as training:
    Qwen3's generation prompt gains the empty reasoning block exactly when enable_thinking is false."""
    import json

    from moecraft.eval.tasks import load_items
    from moecraft.pesc import generate

    tok = model_tokenizer("qwen3")
    rows = tmp_path / "eval.jsonl"
    rows.write_text(json.dumps({"messages": [SYSTEM, *CHAT]}) + "\n" + json.dumps({"prompt": "2+2?", "answer": "4"}) + "\n")
    default = load_items(str(rows), tok, chat_template=True)
    off = load_items(str(rows), tok, chat_template=True, template_kwargs={"enable_thinking": False})
    direct = tok.apply_chat_template([SYSTEM, *CHAT[:3]], tokenize=False, add_generation_prompt=True,
                                     enable_thinking=False)
    assert off[0].prompt == direct and direct.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert default[0].prompt.endswith("<|im_start|>assistant\n") and default[0].references == ["4"]
    assert off[1].prompt.endswith("2+2?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")

    from moecraft.models import load_model

    model, _ = load_model("tiny:llama", dtype="float32", device="cpu")
    seen = []
    model.generate = lambda ids, **kwargs: seen.append(ids[0].tolist()) or ids  # the ids generate() hands over
    for options in (None, {"enable_thinking": False}):
        generate(model, tok, "2+2?", max_new_tokens=1, template_kwargs=options)
    expected = [tok.apply_chat_template([{"role": "user", "content": "2+2?"}], add_generation_prompt=True,
                                        tokenize=True, return_dict=True, **kw)["input_ids"]
                for kw in ({}, {"enable_thinking": False})]
    assert seen == expected and seen[0] != seen[1]
