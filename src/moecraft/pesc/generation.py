"""Text generation with a (crafted, loaded or exported) model: greedy by default, chat template."""

from __future__ import annotations

import torch
from torch import nn

from moecraft.eval.generation import check_prompt_lengths


@torch.no_grad()
def generate(
    model: nn.Module,
    tokenizer,
    prompt: str,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    chat: bool = True,
    seed: int = 0,
    template_kwargs: dict | None = None,
) -> str:
    """Continue ``prompt`` (as one user turn of the chat template when ``chat``, rendered by the renderer that
    score, train and eval use, with ``template_kwargs``); returns only the new text. ``temperature == 0`` is
    greedy decoding."""
    if chat and getattr(tokenizer, "chat_template", None):
        from moecraft.data import render_prompt

        text = render_prompt({"messages": [{"role": "user", "content": prompt}]}, tokenizer, where="the prompt",
                             **(template_kwargs or {}))
        # the template writes its own special tokens (as apply_chat_template's tokenize=True does)
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    else:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    check_prompt_lengths(model, [ids.shape[1]], max_new_tokens, ["the prompt"])
    device = next(model.parameters()).device
    ids = ids.to(device)
    torch.manual_seed(seed)
    kwargs = {"do_sample": False} if temperature <= 0 else {"do_sample": True, "temperature": temperature, "top_p": top_p}
    was_training = model.training
    model.eval()
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, **kwargs,
    )
    model.train(was_training)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
