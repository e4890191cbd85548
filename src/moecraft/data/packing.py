"""Packing rendered examples into fixed-length sequences; seeded sampling and mixing (ESFT paper §3.3).

Sequences live in two flat arrays (int32 ids, uint8 loss mask) with a start/end per sequence
(:class:`PackedSequences`), so 65M packed tokens cost ~330 MB instead of several GB of Python ints. Packing
is one pass over the examples (no re-slicing of a growing list), and sampling renders records in batches
only until enough tokens are packed.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np
from transformers import PreTrainedTokenizerBase

from moecraft.data.render import ArrayExample, Example, render_batch
from moecraft.errors import DataError

_RENDER_BATCH = 64  # most records per tokenizer call while sampling


class NoResponseTokensError(DataError):
    """The sampled sequences hold no trained token (``--seq-len`` too short for where the responses are)."""


class PackedSequences(Sequence):
    """A sequence of ``(input_ids, loss_mask)`` pairs (as lists, like :data:`Example`) held as flat arrays.

    ``seqs[i]`` builds the lists of one sequence on demand; :meth:`arrays` gives numpy views without copies.
    Slicing and :meth:`take` share the arrays. Equality compares contents with any sequence of pairs.
    """

    def __init__(self, ids: np.ndarray, mask: np.ndarray, lo: np.ndarray, hi: np.ndarray):
        self.ids, self.mask, self.lo, self.hi = ids, mask, lo, hi

    @classmethod
    def chunked(cls, ids: np.ndarray, mask: np.ndarray, seq_len: int) -> PackedSequences:
        """Consecutive chunks of ``seq_len`` tokens of the flat arrays (the last may be shorter)."""
        lo = np.arange(0, len(ids), seq_len, dtype=np.int64)
        return cls(ids, mask, lo, np.minimum(lo + seq_len, len(ids)))

    def __len__(self) -> int:
        return len(self.lo)

    def arrays(self, i: int) -> ArrayExample:
        """Sequence ``i`` as numpy views ``(int32 ids, uint8 mask)``."""
        a, b = int(self.lo[i]), int(self.hi[i])
        return self.ids[a:b], self.mask[a:b]

    def __getitem__(self, i):
        if isinstance(i, slice):
            return PackedSequences(self.ids, self.mask, self.lo[i], self.hi[i])
        ids, mask = self.arrays(i)
        return ids.tolist(), mask.tolist()

    def __iter__(self) -> Iterator[Example]:
        return (self[i] for i in range(len(self)))

    def take(self, order: Sequence[int]) -> PackedSequences:
        """The sequences at ``order``, in that order."""
        idx = np.asarray(order, dtype=np.int64)
        return PackedSequences(self.ids, self.mask, self.lo[idx], self.hi[idx])

    def __add__(self, other: PackedSequences) -> PackedSequences:
        shift = len(self.ids)
        return PackedSequences(np.concatenate([self.ids, other.ids]), np.concatenate([self.mask, other.mask]),
                               np.concatenate([self.lo, other.lo + shift]), np.concatenate([self.hi, other.hi + shift]))

    def __eq__(self, other) -> bool:
        if not isinstance(other, Sequence) or len(other) != len(self):
            return False
        for i, pair in enumerate(other):
            ids, mask = self.arrays(i)
            if len(pair) != 2 or len(pair[0]) != len(ids) or not (np.array_equal(ids, np.asarray(pair[0])) and
                                                                  np.array_equal(mask, np.asarray(pair[1]))):
                return False
        return True

    __hash__ = None  # mutable arrays

    def __repr__(self) -> str:
        return f"PackedSequences({len(self)} sequences, {int((self.hi - self.lo).sum())} tokens)"


def pack_sequences(examples: Iterable[Example | ArrayExample], seq_len: int) -> PackedSequences:
    """Concatenate examples into chunks of exactly ``seq_len`` tokens (the last may be shorter).

    This is the ESFT paper's sampling/packing: samples are concatenated into fixed-length sequences, so an
    example may be split across two chunks. Linear in the number of tokens.
    """
    if seq_len < 2:
        raise DataError(f"seq_len must be at least 2, got {seq_len}")
    ids_parts, mask_parts = [], []
    for ids, mask in examples:
        ids_parts.append(np.asarray(ids, dtype=np.int32))
        mask_parts.append(np.asarray(mask, dtype=np.uint8))
    ids = np.concatenate(ids_parts) if ids_parts else np.zeros(0, np.int32)
    mask = np.concatenate(mask_parts) if mask_parts else np.zeros(0, np.uint8)
    return PackedSequences.chunked(ids, mask, seq_len)


def sample_sequences(
    records: Sequence[dict],
    tokenizer: PreTrainedTokenizerBase,
    n_sequences: int,
    seq_len: int,
    seed: int,
    response_only: bool = False,
    repeat: bool = False,
    *,
    source: str | Callable[[int], str] | None = None,
    template_kwargs: dict | None = None,
) -> PackedSequences:
    """Seeded shuffle, render, pack; the first ``n_sequences`` chunks (ESFT §3.3 data sampling).

    Stops rendering as soon as enough tokens are packed, so a large data set costs only what is used.
    With ``response_only`` the returned masks mark response tokens; otherwise every token counts.
    Without ``repeat`` each record is used at most once, so short data gives fewer chunks. With ``repeat``
    the records are cycled, each pass in a fresh order drawn from the same seeded generator (the first pass
    is the order without ``repeat``), until exactly ``n_sequences`` chunks are packed. ``source`` names the
    data in errors (or is a function giving the name of record ``i``); ``template_kwargs`` go to the chat
    template.
    """
    return _sample(records, tokenizer, n_sequences, seq_len, seed, response_only, repeat, source,
                   template_kwargs or {})[0]


def _sample(
    records: Sequence[dict],
    tokenizer: PreTrainedTokenizerBase,
    n_sequences: int,
    seq_len: int,
    seed: int,
    response_only: bool,
    repeat: bool,
    source: str | Callable[[int], str] | None = None,
    template_kwargs: dict | None = None,
) -> tuple[PackedSequences, float]:
    """:func:`sample_sequences` and the number of passes over ``records`` it rendered (1.5 = one and a half)."""
    if n_sequences < 1:
        raise DataError(f"n_sequences must be at least 1, got {n_sequences}")
    if seq_len < 2:
        raise DataError(f"seq_len must be at least 2, got {seq_len}")
    rng = random.Random(seed)
    order = list(range(len(records)))
    needed = n_sequences * seq_len
    ids = np.zeros(needed, dtype=np.int32)  # filled in order, so memory is what training holds, once
    mask = np.zeros(needed, dtype=np.uint8)
    total, used = 0, 0  # tokens packed; records used over all passes
    cache: dict[int, ArrayExample] = {}  # a repeated pass renders nothing again
    stats = [0, 0]  # tokens and records rendered, to size the next render call
    if callable(source):
        name = source
    else:
        def name(i: int) -> str:
            return f"{source}: record {i + 1}" if source else f"record {i + 1}"

    def render(todo: list[int]) -> dict[int, ArrayExample]:
        new = [i for i in dict.fromkeys(todo) if i not in cache]
        got = dict(zip(new, render_batch([records[i] for i in new], tokenizer,
                                         where=[name(i) for i in new], **(template_kwargs or {}))))
        stats[0] += sum(len(x) for x, _ in got.values())
        stats[1] += len(got)
        if repeat:  # only a later pass reads them again
            cache.update(got)
        return {**{i: cache[i] for i in todo if i in cache}, **got}

    done = False
    while not done:
        rng.shuffle(order)
        before = total
        b = 0
        while b < len(order):
            # render about as many records as the missing tokens need, judged by the records rendered so far
            # (the first call renders one record: a huge one is not rendered 64 times over)
            per = stats[0] / stats[1] if stats[1] else needed
            n = max(1, min(_RENDER_BATCH, math.ceil((needed - total) / max(per, 1))))
            batch = order[b : b + n]
            b += n
            examples = render(batch)
            for i in batch:
                x, m = examples[i]
                take = min(len(x), needed - total)
                ids[total : total + take] = x[:take]
                mask[total : total + take] = m[:take] if response_only else 1
                total += take
                used += 1
                if total >= needed:
                    done = True
                    break
            if done:
                break
        if not repeat or total == before:  # one pass only, or records without tokens: no progress
            break
    if total < needed // 2:  # short data: do not keep the unused part of the buffer alive
        ids, mask = ids[:total].copy(), mask[:total].copy()
    chunks = PackedSequences.chunked(ids[:total], mask[:total], seq_len)
    if response_only and not mask[:total].any():
        raise NoResponseTokensError(
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
    *,
    sources: tuple[str | Callable[[int], str] | None, str | Callable[[int], str] | None] = (None, None),
    template_kwargs: dict | None = None,
) -> PackedSequences:
    """``n_sequences`` training sequences, ``round(n_sequences * mix_ratio)`` of them from ``mix_records`` (the
    ESFT paper mixes alignment data into the task data, 1:1 = 0.5), seeded and shuffled together.

    ``mix_ratio`` is a share of sequences, and it is the share realised whatever the sizes of the two data
    sets: each side is packed to its own quota, and a side that one pass does not fill (usually the task
    data) is cycled (:func:`sample_sequences` with ``repeat``). At least one sequence is task data. ``log``
    gets one line saying how many sequences each side gave and how many passes over its records that took.
    ``sources`` names the two data sets in errors.
    """
    if not 0 <= mix_ratio < 1:
        raise DataError(f"mix_ratio must be in [0, 1), got {mix_ratio}")
    n_mix = min(round(n_sequences * mix_ratio), n_sequences - 1) if mix_records else 0
    if n_mix == 0:
        return sample_sequences(records, tokenizer, n_sequences, seq_len, seed, response_only, source=sources[0],
                                template_kwargs=template_kwargs)
    task, task_passes = _sample(records, tokenizer, n_sequences - n_mix, seq_len, seed, response_only, True,
                                sources[0], template_kwargs)
    mix, mix_passes = _sample(mix_records, tokenizer, n_mix, seq_len, seed, response_only, True, sources[1],
                              template_kwargs)
    if log is not None:
        log(f"training data: {len(task)} task sequences ({task_passes:.2f} passes over {len(records)} records) "
            f"+ {len(mix)} mixed-in sequences ({mix_passes:.2f} passes over {len(mix_records)} records) = "
            f"{len(mix) / (len(task) + len(mix)):.1%} mixed in (asked: {mix_ratio:.1%})")
    out = task + mix
    order = list(range(len(out)))
    random.Random(seed + 2).shuffle(order)  # the permutation shuffling the list of sequences would make
    return out.take(order)
