"""Batched generation for evaluation: left padding, greedy by default, stop at EOS or a stop string.

A prompt that leaves no room for ``max_new_tokens`` within the model's ``max_position_embeddings`` is an
error, in ``eval`` and ``generate`` alike (:func:`check_prompt_lengths`): it is never truncated, since
cutting a prompt silently changes the task, and positions past the trained range give silent nonsense.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from moecraft.errors import MoecraftError


def check_prompt_lengths(model, lengths: Sequence[int], max_new_tokens: int, names: Sequence[str]) -> None:
    """Raise :class:`MoecraftError` naming the first prompt (``names[i]``, e.g. "the prompt") that is empty
    or whose ``lengths[i]`` tokens plus ``max_new_tokens`` exceed the model's ``max_position_embeddings``.
    Models without that limit are checked for empty prompts only."""
    config = getattr(model, "config", None)
    limit = getattr(config, "max_position_embeddings", None)
    if not isinstance(limit, int) or isinstance(limit, bool) or limit <= 0:
        limit = None
    for n, name in zip(lengths, names):
        if n < 1:
            raise MoecraftError(f"{name} is empty (0 tokens): there is nothing to continue")
        if limit is not None and n + max_new_tokens > limit:
            model_name = getattr(config, "_name_or_path", "") or type(model).__name__
            raise MoecraftError(
                f"{name} is {n} tokens; with max_new_tokens {max_new_tokens} that makes {n + max_new_tokens}, more "
                f"than the model's max_position_embeddings {limit} ({model_name}): shorten the prompt or lower "
                "--max-new-tokens (prompts are not truncated)")


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
            lengths = enc["attention_mask"].sum(dim=1).tolist()
            check_prompt_lengths(model, lengths, max_new_tokens, [f"{desc}: prompt {i + 1}" for i in idx])
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
