"""Packing and sampling at scale: compact arrays, one linear pass, long texts tokenized in exact pieces."""

from collections.abc import Sequence

import numpy as np
import pytest

import moecraft.data.render as render
from moecraft.data import PackedSequences, pack_sequences, render_example, sample_sequences
from moecraft.models import byte_tokenizer


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def test_packed_sequences_are_flat_arrays_with_list_items():
    examples = [([1, 2, 3], [0, 1, 1]), (np.array([4, 5]), np.array([1, 1])), ([6, 7, 8, 9], [0, 0, 1, 1])]
    chunks = pack_sequences(examples, 4)
    assert isinstance(chunks, PackedSequences) and chunks.ids.dtype == np.int32 and chunks.mask.dtype == np.uint8
    assert list(chunks) == [([1, 2, 3, 4], [0, 1, 1, 1]), ([5, 6, 7, 8], [1, 0, 0, 1]), ([9], [1])]
    assert chunks[1:] == [([5, 6, 7, 8], [1, 0, 0, 1]), ([9], [1])]
    assert chunks.take([2, 0]) == [([9], [1]), ([1, 2, 3, 4], [0, 1, 1, 1])]
    both = chunks + chunks[:1]
    assert len(both) == 4 and both[3] == chunks[0] and both != chunks
    ids, mask = chunks.arrays(0)
    assert np.shares_memory(ids, chunks.ids)  # a view, not a copy


def test_one_huge_record_packs_linearly(tok):
    n, seq_len = 3_000_000, 4096  # the old packer re-sliced the whole list per chunk: minutes for this
    ids = np.arange(n, dtype=np.int32) % 250
    chunks = pack_sequences([(ids, np.ones(n, np.uint8))], seq_len)
    assert len(chunks) == -(-n // seq_len)
    assert chunks.ids.nbytes + chunks.mask.nbytes == 5 * n  # 5 bytes a token, not a Python int object each
    last_ids, _ = chunks.arrays(len(chunks) - 1)
    assert np.array_equal(last_ids, ids[(len(chunks) - 1) * seq_len:])


class CountingRecords(Sequence):
    """Records that count which ones are read."""

    def __init__(self, records):
        self.records, self.read = records, set()

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        self.read.add(i)
        return self.records[i]


def test_sampling_renders_only_what_it_packs(tok):
    recs = CountingRecords([{"text": "x" * 99} for _ in range(10_000)])  # 100 tokens each with EOS
    seqs = sample_sequences(recs, tok, 5, 200, seed=0)
    assert len(seqs) == 5 and all(len(ids) == 200 for ids, _ in seqs)
    assert 10 <= len(recs.read) <= 12  # 1000 tokens need 10 records; a batch may read a little past that


def test_sampled_stream_is_the_rendered_records_in_seeded_order(tok):
    import random

    recs = [{"prompt": f"q{i}" * (1 + i % 5), "response": "a" * (1 + i % 3)} for i in range(50)]
    seqs = sample_sequences(recs, tok, 6, 64, seed=4, response_only=True)
    order = list(range(len(recs)))
    random.Random(4).shuffle(order)
    stream_ids, stream_mask = [], []
    for i in order:
        ids, mask = render_example(recs[i], tok)
        stream_ids += ids
        stream_mask += mask
    assert seqs == [(stream_ids[k:k + 64], stream_mask[k:k + 64]) for k in range(0, 6 * 64, 64)]


def _bpe_with_merges():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    words = ["kami", "tavo", "ne", "lo", "héllo", "x1", "a.b", "  "]
    sample = [" ".join(words[(i * 7 + j) % 8] for j in range(50)) for i in range(200)]
    t.train_from_iterator(sample, trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                      show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=t)
    tok.add_special_tokens({"eos_token": "<|eos|>"})
    return tok


@pytest.mark.parametrize("make", [byte_tokenizer, _bpe_with_merges])
def test_long_texts_are_tokenized_in_pieces_exactly(make, monkeypatch):
    tok = make()
    monkeypatch.setattr(render, "_PIECE", 500)
    words = ["kami", "tavo", "ne", "lo", "héllo", "x1", "a.b", "  ", "\n", "<|eos|>"]
    text = " ".join(words[(i * 13) % len(words)] for i in range(20_000))
    assert len(render._cuts(tok, text)) > 50
    ids, mask = render_example({"text": text}, tok)
    assert ids == tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] and all(mask)


def test_tokenizers_that_do_not_split_are_not_cut(monkeypatch):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["aĠ"] = len(vocab)  # a merge across the space: cutting before a space would change the tokens
    t = Tokenizer(models.BPE(vocab=vocab, merges=[("a", "Ġ")]))
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=t)
    monkeypatch.setattr(render, "_PIECE", 100)
    text = "ba b" * 1000
    assert render._cuts(tok, text) == []
    assert render._ids(tok, [text])[0].tolist() == tok(text, add_special_tokens=False)["input_ids"]
