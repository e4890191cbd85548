"""Data pipeline: tokenize + mask + pack a generated chat corpus; tokens/s and peak RSS (issues 12 and 13).

Old pipeline = ``src/moecraft/data/{render,packing}.py`` at commit 4037e53 (per-turn prefix rendering,
Python lists), loaded from git into a temporary package so both run in this one script. Each measurement
runs in its own process, so its peak RSS (``ru_maxrss``) is its own; the corpus (Python records) is part
of every process and is reported apart.

The corpus: multi-turn chats (optional system turn, 1-3 user/assistant turns, pseudo-words), rendered with
the Qwen2.5 chat template (tests/fixtures/chat_templates) and a byte-level BPE tokenizer (4096 tokens) trained
on a sample of it, so ids and text lengths are those of a real vocabulary. The bare-tokenizer line tokenizes
the same rendered text with the same fast tokenizer (batches of 1000), the render line adds the template;
both run on the old pipeline's corpus size (rates do not depend on it), the new pipeline on both sizes.

    python bench/data.py                                   # 100M tokens new, 10M old, 10M/1M one-record packing
    python bench/data.py --tokens 2e6 --old-tokens 1e6 --pack-tokens 1e6 --old-pack-tokens 2e5   # quick
"""

from __future__ import annotations

import argparse
import importlib
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "tests" / "fixtures" / "chat_templates" / "qwen2_5.jinja"
OLD_COMMIT = "4037e53"
SEQ_LEN = 4096


def corpus(n_tokens: int, chars_per_token: float, seed: int = 0) -> list[dict]:
    """Chat records whose rendering holds about ``n_tokens`` tokens."""
    rng = random.Random(seed)
    syll = ["ka", "lo", "mi", "ne", "ru", "ta", "vo", "si", "de", "pa", "zu", "qe", "xi", "bo", "fa", "ge"]
    words = ["".join(rng.choice(syll) for _ in range(rng.randint(1, 4))) for _ in range(3000)]

    def text(lo, hi):
        return " ".join(rng.choice(words) for _ in range(rng.randint(lo, hi))) + rng.choice([".", "?", "!"])

    out, chars, budget = [], 0, n_tokens * chars_per_token
    while chars < budget:
        msgs = [{"role": "system", "content": text(5, 30)}] if rng.random() < 0.5 else []
        for _ in range(rng.randint(1, 3)):
            msgs += [{"role": "user", "content": text(10, 120)}, {"role": "assistant", "content": text(20, 300)}]
        out.append({"messages": msgs})
        chars += sum(len(m["content"]) + 25 for m in msgs)
    return out


def tokenizer(folder: Path):
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>", additional_special_tokens=["<|im_start|>"])
    tok.chat_template = TEMPLATE.read_text(encoding="utf-8")
    return tok


def train_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=4096, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    sample = corpus(300_000, 4.0, seed=1)
    tok.train_from_iterator((m["content"] for r in sample for m in r["messages"]), trainer=trainer)
    tok.save(str(folder / "tokenizer.json"))


def old_modules(tmp: Path):
    """render/packing of ``OLD_COMMIT`` as the package ``old_data``."""
    pkg = tmp / "old_data"
    pkg.mkdir(exist_ok=True)
    (pkg / "__init__.py").write_text("")
    for name in ("render", "packing"):
        src = subprocess.run(["git", "-C", str(ROOT), "show", f"{OLD_COMMIT}:src/moecraft/data/{name}.py"],
                             check=True, capture_output=True, text=True).stdout
        (pkg / f"{name}.py").write_text(src.replace("moecraft.data.render", "old_data.render"))
    sys.path.insert(0, str(tmp))
    return importlib.import_module("old_data.packing")


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(args) -> dict:
    """One measurement, in this process."""
    folder = Path(args.folder)
    tok = tokenizer(folder)
    cpt = json.loads((folder / "cpt.json").read_text())["chars_per_token"]
    n = int(args.tokens)
    if args.child.startswith("pack"):
        return pack_child(args, tok, n)
    records = corpus(n, cpt)
    base = rss_mb()
    t0 = time.perf_counter()
    if args.child == "bare":  # the rendered text, tokenized by the fast tokenizer alone
        texts = [tok.apply_chat_template(r["messages"], tokenize=False) for r in records]
        t0, tokens = time.perf_counter(), 0
        for b in range(0, len(texts), 1000):
            tokens += sum(len(e.ids) for e in tok.backend_tokenizer.encode_batch(texts[b:b + 1000],
                                                                               add_special_tokens=False))
    elif args.child == "render":  # chat template + fast tokenizer, no masks: the floor of any template pipeline
        tokens = 0
        for b in range(0, len(records), 1000):
            texts = [tok.apply_chat_template(r["messages"], tokenize=False) for r in records[b:b + 1000]]
            tokens += sum(len(e.ids) for e in tok.backend_tokenizer.encode_batch(texts, add_special_tokens=False))
    else:
        if args.child == "old":
            sample = old_modules(Path(args.tmp)).sample_sequences
        else:
            from moecraft.data import sample_sequences as sample
        seqs = sample(records, tok, n_sequences=10**9 // SEQ_LEN, seq_len=SEQ_LEN, seed=0, response_only=True)
        tokens = sum(len(seqs[i][0]) for i in range(len(seqs)))
        trained = sum(sum(seqs[i][1]) for i in range(min(len(seqs), 50)))
        assert trained > 0
    secs = time.perf_counter() - t0
    return {"what": args.child, "records": len(records), "tokens": tokens, "seconds": secs,
            "tokens_per_s": tokens / secs, "peak_rss_mb": rss_mb(), "corpus_rss_mb": base}


def pack_child(args, tok, n: int) -> dict:
    """Packing one record of ``n`` tokens (issue 13): old and new ``pack_sequences``, and the new sampler."""
    import numpy as np

    base = rss_mb()
    t0 = time.perf_counter()
    if args.child == "pack-old":
        ids = list(np.random.default_rng(0).integers(0, 4000, n))  # the old renderer's output: lists of ints
        ids = [int(x) for x in ids]
        t0 = time.perf_counter()
        chunks = old_modules(Path(args.tmp)).pack_sequences([(ids, [1] * n)], SEQ_LEN)
    elif args.child == "pack-new":
        ids = np.random.default_rng(0).integers(0, 4000, n).astype(np.int32)
        t0 = time.perf_counter()
        from moecraft.data import pack_sequences

        chunks = pack_sequences([(ids, np.ones(n, np.uint8))], SEQ_LEN)
    else:  # pack-sample: a text record of n tokens through render + pack
        from moecraft.data import sample_sequences

        words = " ".join(("lo", "kami", "tavo", "ne")[i % 4] for i in range(n))
        rec = {"text": words}
        t0 = time.perf_counter()
        chunks = sample_sequences([rec], tok, n_sequences=10**9 // SEQ_LEN, seq_len=SEQ_LEN, seed=0)
        n = sum(len(chunks[i][0]) for i in range(len(chunks)))
    secs = time.perf_counter() - t0
    return {"what": args.child, "tokens": n, "chunks": len(chunks), "seconds": secs, "tokens_per_s": n / secs,
            "peak_rss_mb": rss_mb(), "corpus_rss_mb": base}


def spawn(what: str, tokens: float, folder: Path, tmp: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", what, "--tokens", str(int(tokens)), "--folder", str(folder),
           "--tmp", str(tmp)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(f"{what} failed:\n{res.stderr[-3000:]}")
    row = json.loads(res.stdout.strip().splitlines()[-1])
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=float, default=100e6, help="chat corpus size for the new pipeline")
    ap.add_argument("--old-tokens", type=float, default=10e6,
                    help="chat corpus size for the old pipeline, the bare tokenizer and a second new run")
    ap.add_argument("--pack-tokens", type=float, default=10e6, help="one-record packing, new")
    ap.add_argument("--old-pack-tokens", type=float, default=1e6, help="one-record packing, old (quadratic)")
    ap.add_argument("--rows", help="run only these rows of the table, e.g. 1,4 (default: all)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    ap.add_argument("--tmp", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        train_tokenizer(folder)
        tok = tokenizer(folder)
        sample = corpus(200_000, 4.0, seed=2)
        texts = [tok.apply_chat_template(r["messages"], tokenize=False) for r in sample]
        chars = sum(map(len, texts))
        toks = sum(len(e.ids) for e in tok.backend_tokenizer.encode_batch(texts, add_special_tokens=False))
        (folder / "cpt.json").write_text(json.dumps({"chars_per_token": chars / toks}))
        plan = [("bare", args.old_tokens), ("render", args.old_tokens), ("old", args.old_tokens),
                ("new", args.old_tokens), ("new", args.tokens), ("pack-new", args.pack_tokens),
                ("pack-sample", args.pack_tokens), ("pack-new", args.old_pack_tokens),
                ("pack-old", args.old_pack_tokens)]
        only = args.rows.split(",") if args.rows else None
        rows = [spawn(what, n, folder, folder) for j, (what, n) in enumerate(plan) if only is None or str(j + 1) in only]
    print("\n| run | tokens | s | tokens/s | peak RSS MB | of which corpus |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['what']} | {r['tokens']:,} | {r['seconds']:.1f} | {r['tokens_per_s']:,.0f} | "
              f"{r['peak_rss_mb']:,.0f} | {r['corpus_rss_mb']:,.0f} |")


if __name__ == "__main__":
    main()
