"""Byte-level BPE for the pretrained models, trained with ``tokenizers`` on the corpus and the task text.

Byte-level means every string is encodable (Chinese included) and ``decode(encode(s)) == s`` exactly; the
task text (ESFT intent/law training rows, the built-in arithmetic problems) is in the training text so that
Chinese gets merges of its own instead of three byte tokens a character. Only training splits are used:
held-out corpus text and evaluation rows never shape the vocabulary.

Saved as a ``PreTrainedTokenizerFast`` folder with moecraft's chat template (``User: ...\\n\\nAssistant: ...``,
the format of the ESFT evaluation prompts) and bos/eos/pad set, which ``moecraft --model <folder>`` reads.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from replicate.common import ESFT_DATA, Scale, read_jsonl, write_json

SPECIAL = {"bos_token": "<|bos|>", "eos_token": "<|eos|>", "pad_token": "<|pad|>"}


def task_texts(limit: int | None) -> Iterator[str]:
    """Message contents of the task training data (at most ``limit`` rows per file)."""
    from moecraft.builtin_data import generate

    files = [ESFT_DATA / "train-intent.jsonl", ESFT_DATA / "train-law.jsonl"]
    for path in files:
        if not path.is_file():
            print(f"  tokenizer: {path} not found; its text is left out", flush=True)
            continue
        for row in read_jsonl(path)[:limit]:
            yield "\n".join(m["content"] for m in row["messages"])
    for row in generate("arithmetic", "train")[:limit]:
        yield "\n".join(m["content"] for m in row["messages"])


def corpus_texts(corpus: Path) -> Iterator[str]:
    for path in sorted(corpus.glob("*.train.jsonl")):
        with path.open(encoding="utf-8") as f:
            for line in f:
                yield json.loads(line)["text"]


def train(corpus: Path, out: Path, scale: Scale, model_max_length: int) -> Path:
    """Train the BPE, save the transformers folder at ``out``, and check it round-trips sample text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from moecraft.models import CHAT_TEMPLATE

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=scale.vocab_size, min_frequency=2, show_progress=False,
                                  special_tokens=list(SPECIAL.values()),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())

    def texts() -> Iterator[str]:
        yield from corpus_texts(corpus)
        yield from task_texts(scale.tokenizer_task_records)

    tok.train_from_iterator(texts(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=model_max_length,
                                   clean_up_tokenization_spaces=False, **SPECIAL)
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out))
    loaded = AutoTokenizer.from_pretrained(str(out))
    samples = [next(task_texts(1)), "def f(x):\n\treturn {'a': x}  # 注释\n", "  spaces  and\ttabs \n"]
    for s in samples:
        if not roundtrips(loaded, s):
            raise SystemExit(f"tokenizer: does not round-trip {s[:60]!r}")
    write_json(out / "tokenizer_info.json", {"vocab_size": len(loaded), "trained_on": "corpus *.train.jsonl + "
                                             "task training rows", "task_rows_per_file": scale.tokenizer_task_records})
    return out


def roundtrips(tokenizer, text: str) -> bool:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer.decode(ids, clean_up_tokenization_spaces=False) == text
