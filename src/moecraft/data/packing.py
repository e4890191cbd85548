"""Packing rendered examples into fixed-length sequences; seeded sampling and mixing (ESFT paper §3.3)."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Sequence

from transformers import PreTrainedTokenizerBase

from moecraft.data.render import Example, render_example
from moecraft.errors import DataError


def pack_sequences(examples: Iterable[Example], seq_len: int) -> list[Example]:
    """Concatenate examples into chunks of exactly ``seq_len`` tokens (the last may be shorter).

    This is the ESFT paper's sampling/packing: samples are concatenated into fixed-length sequences, so an
    example may be split across two chunks.
    """
    if seq_len < 2:
        raise DataError(f"seq_len must be at least 2, got {seq_len}")
    chunks: list[Example] = []
    buf_ids: list[int] = []
    buf_mask: list[int] = []
    for ids, mask in examples:
        buf_ids += ids
        buf_mask += mask
        while len(buf_ids) >= seq_len:
            chunks.append((buf_ids[:seq_len], buf_mask[:seq_len]))
            buf_ids, buf_mask = buf_ids[seq_len:], buf_mask[seq_len:]
    if buf_ids:
        chunks.append((buf_ids, buf_mask))
    return chunks


def sample_sequences(
    records: Sequence[dict],
    tokenizer: PreTrainedTokenizerBase,
    n_sequences: int,
    seq_len: int,
    seed: int,
    response_only: bool = False,
    repeat: bool = False,
) -> list[Example]:
    """Seeded shuffle, render, pack; the first ``n_sequences`` chunks (ESFT §3.3 data sampling).

    Stops rendering as soon as enough tokens are packed, so a large data set costs only what is used.
    With ``response_only`` the returned masks mark response tokens; otherwise every token counts.
    Without ``repeat`` each record is used at most once, so short data gives fewer chunks. With ``repeat``
    the records are cycled, each pass in a fresh order drawn from the same seeded generator (the first pass
    is the order without ``repeat``), until exactly ``n_sequences`` chunks are packed.
    """
    return _sample(records, tokenizer, n_sequences, seq_len, seed, response_only, repeat)[0]


def _sample(
    records: Sequence[dict],
    tokenizer: PreTrainedTokenizerBase,
    n_sequences: int,
    seq_len: int,
    seed: int,
    response_only: bool,
    repeat: bool,
) -> tuple[list[Example], float]:
    """:func:`sample_sequences` and the number of passes over ``records`` it rendered (1.5 = one and a half)."""
    if n_sequences < 1:
        raise DataError(f"n_sequences must be at least 1, got {n_sequences}")
    rng = random.Random(seed)
    order = list(range(len(records)))
    needed = n_sequences * seq_len
    used = 0  # records rendered, over all passes

    def rendered():
        nonlocal used
        total, cache = 0, {}
        while True:
            rng.shuffle(order)
            before = total
            for i in order:
                if i not in cache:  # a repeated pass renders nothing again
                    ids, mask = render_example(records[i], tokenizer)
                    cache[i] = ids, (mask if response_only else [1] * len(ids))
                yield cache[i]
                used += 1
                total += len(cache[i][0])
                if total >= needed:
                    return
            if not repeat or total == before:  # one pass only, or records without tokens: no progress
                return

    chunks = pack_sequences(rendered(), seq_len)[:n_sequences]
    if response_only and not any(any(m) for _, m in chunks):
        raise DataError(
            f"the {len(chunks)} sampled sequence(s) of {seq_len} tokens hold no response tokens (the loss would "
            "be empty): use a longer --seq-len, or data with responses (chat assistant turns, 'response', 'text')"
        )
    return chunks, used / max(len(records), 1)


def mix_sequences(
    records: Sequence[dict],
    mix_records: Sequence[dict],
    tokenizer: PreTrainedTokenizerBase,
    n_sequences: int,
    mix_ratio: float,
    seq_len: int,
    seed: int,
    response_only: bool = True,
    log: Callable[[str], None] | None = print,
) -> list[Example]:
    """``n_sequences`` training sequences, ``round(n_sequences * mix_ratio)`` of them from ``mix_records`` (the
    ESFT paper mixes alignment data into the task data, 1:1 = 0.5), seeded and shuffled together.

    ``mix_ratio`` is a share of sequences, and it is the share realised whatever the sizes of the two data
    sets: each side is packed to its own quota, and a side that one pass does not fill (usually the task
    data) is cycled (:func:`sample_sequences` with ``repeat``). At least one sequence is task data. ``log``
    gets one line saying how many sequences each side gave and how many passes over its records that took.
    """
    if not 0 <= mix_ratio < 1:
        raise DataError(f"mix_ratio must be in [0, 1), got {mix_ratio}")
    n_mix = min(round(n_sequences * mix_ratio), n_sequences - 1) if mix_records else 0
    if n_mix == 0:
        return sample_sequences(records, tokenizer, n_sequences, seq_len, seed, response_only)
    task, task_passes = _sample(records, tokenizer, n_sequences - n_mix, seq_len, seed, response_only, True)
    mix, mix_passes = _sample(mix_records, tokenizer, n_mix, seq_len, seed, response_only, True)
    if log is not None:
        log(f"training data: {len(task)} task sequences ({task_passes:.2f} passes over {len(records)} records) "
            f"+ {len(mix)} mixed-in sequences ({mix_passes:.2f} passes over {len(mix_records)} records) = "
            f"{len(mix) / (len(task) + len(mix)):.1%} mixed in (asked: {mix_ratio:.1%})")
    out = task + mix
    random.Random(seed + 2).shuffle(out)
    return out
