"""General ability kept: perplexity on a held-out corpus.

``ppl = exp( sum_t NLL_t / N )`` over every scored token t of every record (token-weighted, so a long
document counts by its length, not as one sample). Records are rendered with
:func:`moecraft.data.render_example`; its loss mask picks the scored tokens (all of them for ``{"text"}``
rows), and documents longer than ``seq_len`` are scored in consecutive non-overlapping windows.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from moecraft.errors import DataError


@torch.no_grad()
def perplexity(
    model, tokenizer, records: list[dict], seq_len: int = 1024, batch_size: int = 4, progress: bool = True
) -> dict:
    """``{"nll": mean NLL per token, "ppl": exp(nll), "n_tokens": N}`` of the model on ``records``."""
    from moecraft.data import render_example

    windows: list[tuple[list[int], list[int]]] = []
    for rec in records:
        ids, mask = render_example(rec, tokenizer)
        for s in range(0, len(ids), seq_len):
            w_ids, w_mask = ids[s : s + seq_len], mask[s : s + seq_len]
            if len(w_ids) > 1 and any(w_mask[1:]):  # the first token of a window has no context
                windows.append((w_ids, w_mask))
    if not windows:
        raise DataError("perplexity: no tokens to score (empty records or all-zero loss masks)")
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    windows.sort(key=lambda w: -len(w[0]))
    total, count = 0.0, 0
    for b in tqdm(range(0, len(windows), batch_size), desc="perplexity", disable=not progress, unit="batch"):
        chunk = windows[b : b + batch_size]
        width = max(len(w[0]) for w in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        att = torch.zeros((len(chunk), width), dtype=torch.long)
        tgt = torch.zeros((len(chunk), width), dtype=torch.bool)
        for i, (w_ids, w_mask) in enumerate(chunk):  # right padding: positions stay 0..n-1
            ids[i, : len(w_ids)] = torch.tensor(w_ids)
            att[i, : len(w_ids)] = 1
            tgt[i, : len(w_ids)] = torch.tensor(w_mask, dtype=torch.bool)
        logits = model(input_ids=ids.to(device), attention_mask=att.to(device)).logits.float()
        nll = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1).to(device), reduction="none"
        ).view(len(chunk), width - 1)
        keep = tgt[:, 1:].to(device)
        total += float(nll[keep].double().sum())
        count += int(keep.sum())
    mean = total / count
    return {"nll": mean, "ppl": math.exp(mean), "n_tokens": count}
