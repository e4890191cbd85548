"""Batched generation for evaluation: left padding, greedy by default, stop at EOS or a stop string."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm


@torch.no_grad()
def generate_texts(
    model,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int = 128,
    batch_size: int = 8,
    temperature: float = 0.0,
    stop: Sequence[str] = (),
    seed: int = 0,
    progress: bool = True,
    desc: str = "generate",
) -> list[str]:
    """Continuations of ``prompts`` (decoded, special tokens dropped, cut at the first stop string).

    Prompts are tokenized as is (a chat template has already placed BOS). They are sorted by length so
    each batch pads little, and the results are put back in input order. ``temperature == 0`` is greedy.
    """
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out: list[str] = [""] * len(prompts)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # decoder-only models continue from the right edge
    torch.manual_seed(seed)
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    try:
        batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        for idx in tqdm(batches, desc=desc, disable=not progress, unit="batch"):
            enc = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False)
            enc = {k: v.to(device) for k, v in enc.items()}
            gen = model.generate(
                **enc, max_new_tokens=max_new_tokens, pad_token_id=pad_id, eos_token_id=tokenizer.eos_token_id,
                **sampling,
            )
            new = gen[:, enc["input_ids"].shape[1] :]
            for i, ids in zip(idx, new):
                out[i] = cut_at_stop(tokenizer.decode(ids, skip_special_tokens=True), stop)
    finally:
        tokenizer.padding_side = old_side
    return out


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """``text`` up to the earliest occurrence of any stop string."""
    cut = min((p for p in (text.find(s) for s in stop if s) if p >= 0), default=len(text))
    return text[:cut]
