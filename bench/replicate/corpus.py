"""Pretraining corpus from what a Debian machine has offline: two domains, a deterministic held-out split.

- code:  Python standard-library source, ``/usr/lib/python3.X/**/*.py`` (always present; the Debian
         package ``libpython3.X-testsuite`` adds the test suite, about twice the code);
- prose: the Python documentation (``python3.X-doc``, HTML stripped to text), the GNU Collaborative
         International Dictionary of English (``dict-gcide``) and WordNet glosses (``wordnet-base``).
A missing optional source is skipped and named in the manifest with the package that provides it.

A document goes to the held-out split when ``sha256(source/name) mod 100 < heldout_percent``: the split
depends only on the document's name, so it is the same on every machine and every run. Documents are cut
into records of at most ``record_chars`` characters at line ends (``{"text", "source", "doc"}`` JSONL,
the shape ``moecraft eval --perplexity-data`` reads). ``manifest.json`` lists every source (files, bytes,
a sha256 over its inputs) and every output file with its sha256.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import html
import random
import re
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

from replicate.common import DOMAINS, Scale, sha256_file, write_json, write_jsonl

Doc = tuple[str, str]  # (name, text)


# ----------------------------------------------------------------------------- sources
def _versioned(pattern: str) -> list[Path]:
    """Distinct real folders matching ``pattern`` whose name (or parent's, for .../html) is ``python3.N``."""
    found = {Path(p).resolve() for p in glob.glob(pattern)}
    return sorted(p for p in found if re.fullmatch(r"python3\.\d+", p.name if p.name != "html" else p.parent.name))


def stdlib_code() -> Iterator[Doc]:
    """Every UTF-8 ``.py`` file of each installed CPython standard library (site/dist-packages excluded)."""
    for root in _versioned("/usr/lib/python3*"):
        for path in sorted(Path(root).rglob("*.py")):
            if {"site-packages", "dist-packages"} & set(path.parts):
                continue
            try:
                yield f"{root.name}/{path.relative_to(root)}", path.read_bytes().decode("utf-8")
            except (UnicodeDecodeError, OSError):
                continue  # a few test files are deliberately not UTF-8


class _HTMLText(HTMLParser):
    """Text of the Sphinx main content (``role="main"``), without scripts, styles and navigation."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.depth = 0  # > 0 while inside the main block
        self.skip = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if self.depth:
            self.depth += tag not in _VOID
        elif dict(attrs).get("role") == "main":
            self.depth = 1
        if tag in ("script", "style"):
            self.skip += 1
        if tag in ("p", "div", "br", "li", "pre", "h1", "h2", "h3", "h4", "dt", "dd", "tr") and self.depth:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "style") and self.skip:
            self.skip -= 1
        if self.depth and tag not in _VOID:
            self.depth -= 1

    def handle_data(self, data: str) -> None:
        if self.depth and not self.skip:
            self.parts.append(data)

    def text(self) -> str:
        text = html.unescape("".join(self.parts)).replace("¶", "")
        return re.sub(r"\n\s*\n+", "\n\n", text).strip()


_VOID = {"br", "img", "hr", "meta", "link", "input", "col", "area", "base", "wbr", "source"}


def python_docs() -> Iterator[Doc]:
    for root in _versioned("/usr/share/doc/python3*/html"):
        for path in sorted(Path(root).rglob("*.html")):
            rel = path.relative_to(root)
            if rel.parts[0].startswith("_") or rel.stem in ("genindex", "search", "py-modindex"):
                continue
            parser = _HTMLText()
            parser.feed(path.read_text(encoding="utf-8", errors="replace"))
            text = parser.text()
            if len(text) > 200:
                yield f"{root.parent.name}/{rel}", text


def gcide(block_chars: int = 64_000) -> Iterator[Doc]:
    """Dictionary entries in alphabetical blocks (an entry starts at an unindented line)."""
    for path in sorted(glob.glob("/usr/share/dictd/gcide*.dict.dz")):
        with gzip.open(path, "rt", encoding="utf-8", errors="replace") as f:
            block: list[str] = []
            size, n = 0, 0
            for line in f:
                if size >= block_chars and line[:1].strip():
                    yield f"{Path(path).name}#{n:05d}", "".join(block)
                    block, size, n = [], 0, n + 1
                block.append(line)
                size += len(line)
            if block:
                yield f"{Path(path).name}#{n:05d}", "".join(block)


def wordnet(lines_per_doc: int = 1500) -> Iterator[Doc]:
    """``word, word: gloss`` lines from the WordNet data files."""
    for pos in ("noun", "verb", "adj", "adv"):
        path = Path(f"/usr/share/wordnet/data.{pos}")
        if not path.is_file():
            continue
        out: list[str] = []
        n = 0
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("  ") or "|" not in line:
                continue  # licence header
            head, gloss = line.split("|", 1)
            fields = head.split()
            words = [w.replace("_", " ") for w in fields[4 : 4 + 2 * int(fields[3], 16) : 2]]
            out.append(f"{', '.join(words)} ({pos}): {gloss.strip()}")
            if len(out) == lines_per_doc:
                yield f"data.{pos}#{n:04d}", "\n".join(out)
                out, n = [], n + 1
        if out:
            yield f"data.{pos}#{n:04d}", "\n".join(out)


# name -> (domain, documents, Debian package that provides it, whether it is optional)
SOURCES = {
    "stdlib": ("code", stdlib_code, "libpython3-stdlib (+ libpython3.11-testsuite)", False),
    "python-doc": ("prose", python_docs, "python3.11-doc", True),
    "gcide": ("prose", gcide, "dict-gcide", True),
    "wordnet": ("prose", wordnet, "wordnet-base", True),
}


# ----------------------------------------------------------------------------- split and records
def is_heldout(source: str, name: str, percent: int) -> bool:
    digest = hashlib.sha256(f"{source}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % 100 < percent


def records(text: str, limit: int) -> Iterator[str]:
    """Cut at line ends into pieces of at most ``limit`` characters (a longer line is cut anywhere)."""
    buf: list[str] = []
    size = 0
    for line in text.splitlines(keepends=True):
        while len(line) > limit:
            yield line[:limit]
            line = line[limit:]
        if size + len(line) > limit and buf:
            yield "".join(buf)
            buf, size = [], 0
        buf.append(line)
        size += len(line)
    if buf and "".join(buf).strip():
        yield "".join(buf)


def build(out: Path, scale: Scale) -> dict:
    """Write ``<domain>.<train|heldout>.jsonl`` and ``manifest.json`` under ``out``; returns the manifest."""
    rows: dict[str, list[dict]] = {f"{d}.{s}": [] for d in DOMAINS for s in ("train", "heldout")}
    sources: dict[str, dict] = {}
    for name, (domain, docs, package, optional) in SOURCES.items():
        inputs = hashlib.sha256()
        n_docs, n_bytes, n_heldout = 0, 0, 0
        for doc, text in docs():
            if scale.max_docs_per_source is not None and n_docs >= scale.max_docs_per_source:
                break
            if scale.max_bytes_per_source is not None and n_bytes >= scale.max_bytes_per_source:
                break
            data = text.encode("utf-8")
            inputs.update(doc.encode() + b"\0" + hashlib.sha256(data).digest())
            split = "heldout" if is_heldout(name, doc, scale.heldout_percent) else "train"
            n_heldout += split == "heldout"
            rows[f"{domain}.{split}"] += [{"text": r, "source": name, "doc": doc}
                                          for r in records(text, scale.record_chars)]
            n_docs += 1
            n_bytes += len(data)
        sources[name] = {"domain": domain, "package": package, "available": n_docs > 0, "optional": optional,
                         "documents": n_docs, "heldout_documents": n_heldout, "bytes": n_bytes,
                         "inputs_sha256": inputs.hexdigest()}
        if not n_docs and not optional:
            raise SystemExit(f"corpus: required source '{name}' is empty (install {package})")
        print(f"  {name:11s} {domain:5s} {n_docs:6d} documents {n_bytes / 1e6:8.2f} MB"
              + ("" if n_docs else f"  (not installed: apt-get install {package})"), flush=True)
    found = [d for d in DOMAINS if rows[f"{d}.train"] and rows[f"{d}.heldout"]]
    for d in DOMAINS:
        if d not in found:
            print(f"  domain '{d}' left out: no installed source gave it both a training and a held-out split",
                  flush=True)
    if not found:
        raise SystemExit("corpus: no domain has data; install the packages listed above")
    outputs = {}
    for key, recs in rows.items():
        if key.split(".")[0] not in found:
            continue
        if key.endswith("heldout"):  # perplexity reads the first N records: spread them over documents
            random.Random(0).shuffle(recs)
        path = write_jsonl(out / f"{key}.jsonl", recs)
        outputs[path.name] = {"records": len(recs), "chars": sum(len(r["text"]) for r in recs),
                              "bytes": path.stat().st_size, "sha256": sha256_file(path)}
    manifest = {"scale": scale.name, "domains": found, "heldout_percent": scale.heldout_percent, "record_chars": scale.record_chars,
                "split_rule": "heldout iff int(sha256(source/doc)[:8 bytes]) % 100 < heldout_percent",
                "sources": sources, "missing": [n for n, s in sources.items() if not s["available"]],
                "outputs": outputs}
    write_json(out / "manifest.json", manifest)
    return manifest
