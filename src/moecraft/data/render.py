"""Rendering records to token ids and loss masks: chat templates for chat records, raw text otherwise.

A chat record is rendered **once** with its chat template; the trained character spans are then found in
that one text and mapped to tokens through the fast tokenizer's character offsets, so one tokenizer call
covers a record (and :func:`render_batch` covers many records in one call).

What is trained in a chat: every message whose ``weight`` is truthy (default: assistant messages). For an
assistant message that is everything the model generates after the template's generation prompt, up to and
including the template's own end-of-turn token (``<|im_end|>``, ``<|eot_id|>``, ``</s>``...); for another
role, its content and end-of-turn token. Nothing is appended that the template did not render.

Finding the spans: the record is rendered once more with every message's content replaced by a unique
sentinel (cached per conversation shape, so a data set of like records pays for it once). The real text must
then read as the sentinel text with each sentinel replaced by the content (or the content stripped, as
``| trim`` templates do), which fixes every span exactly. Templates that change content in other ways
(Qwen3 drops the reasoning of earlier turns and adds an empty ``<think>`` block to the last one) take a
per-message path: render with only that message's content replaced, check that what follows it is a suffix
of the real text and that the generation prompt before it is a prefix, and take the span in between. When
neither holds, :class:`DataError` names the record: a mask is never guessed.
"""

from __future__ import annotations

import json
import re
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from transformers import PreTrainedTokenizerBase

from moecraft.data.records import record_kind
from moecraft.errors import DataError

Example = tuple[list[int], list[int]]  # (input_ids, loss_mask)
ArrayExample = tuple[np.ndarray, np.ndarray]  # (int32 input_ids, uint8 loss_mask)

_SENTINEL = "@@MOECRAFT{}@@"  # survives trim/strip; no whitespace, no markup a template reacts to
_SENTINEL_RE = re.compile(r"@@MOECRAFT(\d+)@@")


def _encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    # the chat template already places BOS where the model wants it
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def trained(message: dict) -> bool:
    """Whether a chat message is in the loss: its ``weight``, by default 1 for assistant messages only."""
    return bool(message.get("weight", 1 if message["role"] == "assistant" else 0))


def render_prompt(record: dict, tokenizer: PreTrainedTokenizerBase, *, where: str | None = None,
                  **template_kwargs) -> str:
    """The text a model should continue: chat template up to the last assistant turn, or the raw prompt.

    ``where`` names the record in errors."""
    kind = record_kind(record)
    if kind == "chat":
        msgs = record["messages"]
        if msgs[-1]["role"] == "assistant":
            msgs = msgs[:-1]
        return _apply(tokenizer, msgs, True, record.get("tools"), template_kwargs, where)
    if kind == "pair" or "prompt" in record:
        return record["prompt"]
    raise DataError(f"record with fields {sorted(record)} has no prompt to generate from")


def render_example(record: dict, tokenizer: PreTrainedTokenizerBase, **template_kwargs) -> Example:
    """``(input_ids, loss_mask)`` of one record, as lists.

    chat: the template's rendering, mask on the trained messages (see the module docstring).
    pair: prompt + response + EOS, mask on response and EOS. text: text + EOS, all in the mask.
    """
    ids, mask = render_batch([record], tokenizer, **template_kwargs)[0]
    return ids.tolist(), mask.tolist()


def render_batch(records: list[dict], tokenizer: PreTrainedTokenizerBase, *, where: list[str] | None = None,
                 **template_kwargs) -> list[ArrayExample]:
    """:func:`render_example` of many records in one tokenizer call each kind: int32 ids, uint8 masks.

    ``where`` names each record in errors (default: ``record <i>``); ``template_kwargs`` go to the chat
    template (e.g. ``enable_thinking=False``).
    """
    out: list[ArrayExample | None] = [None] * len(records)
    chats: list[tuple[int, str, list[tuple[int, int]]]] = []
    pairs: list[int] = []
    texts: list[int] = []
    for i, rec in enumerate(records):
        kind = record_kind(rec)
        if kind == "chat":
            name = where[i] if where else f"record {i + 1}"
            text, spans = _renderer(tokenizer, template_kwargs).chat(rec, name)
            chats.append((i, text, spans))
        elif kind == "pair":
            pairs.append(i)
        elif kind == "text":
            texts.append(i)
        else:
            raise DataError(f"record with fields {sorted(rec)} is not chat, pair or text")
    eos = tokenizer.eos_token_id
    tail = np.array([eos] if eos is not None else [], dtype=np.int32)
    if texts:
        for i, ids in zip(texts, _ids(tokenizer, [records[i]["text"] for i in texts])):
            ids = np.concatenate([ids, tail])
            out[i] = ids, np.ones(len(ids), dtype=np.uint8)
    if pairs:  # prompt and response tokenized apart (as the model sees a prompt), then EOS
        prompts = _ids(tokenizer, [records[i]["prompt"] for i in pairs])
        resps = _ids(tokenizer, [records[i].get("response", records[i].get("completion")) for i in pairs])
        for i, p, r in zip(pairs, prompts, resps):
            r = np.concatenate([r, tail])
            out[i] = np.concatenate([p, r]), np.concatenate([np.zeros(len(p), np.uint8), np.ones(len(r), np.uint8)])
    if chats:
        for (i, _, _), ex in zip(chats, _masked(tokenizer, [(t, s) for _, t, s in chats])):
            out[i] = ex
    return out  # type: ignore[return-value]


# ----------------------------------------------------------------------------- tokenization
_PIECE = 1 << 16  # characters per tokenizer call when a long text is cut into pieces


def _ids(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[np.ndarray]:
    """Token ids of each text (no special tokens added). A text much longer than ``_PIECE`` is tokenized in
    pieces cut where the tokenizer provably splits anyway (:func:`_cuts`): a single 50 MB text would take
    minutes and GBs in one call, as one pre-token, or with per-token offsets held for all of it."""
    backend = getattr(tokenizer, "backend_tokenizer", None) if tokenizer.is_fast else None
    if backend is None:
        return [np.asarray(_encode(tokenizer, t), dtype=np.int32) for t in texts]
    pieces, owner = [], []
    for j, t in enumerate(texts):
        cuts = _cuts(tokenizer, t) if len(t) > 2 * _PIECE else []
        for a, b in zip([0, *cuts], [*cuts, len(t)]):
            pieces.append(t[a:b])
            owner.append(j)
    out: list[list[np.ndarray]] = [[] for _ in texts]
    for b in range(0, len(pieces), 256):  # bounded batches: the Encodings of a batch are held at once
        for j, e in zip(owner[b:b + 256], backend.encode_batch(pieces[b:b + 256], add_special_tokens=False)):
            out[j].append(np.asarray(e.ids, dtype=np.int32))
    return [x[0] if len(x) == 1 else np.concatenate(x) if x else np.zeros(0, np.int32) for x in out]


_SPLITS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _cuts(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Positions about every ``_PIECE`` characters, each before a space that follows an ASCII letter or digit,
    where tokenizing the pieces apart gives the same tokens as the whole: the tokenizer has no merges (a
    byte/char vocabulary), or its pre-tokenizer splits there (checked on the text around each cut)."""
    if tokenizer not in _SPLITS:
        backend = tokenizer.backend_tokenizer
        model = json.loads(backend.to_str()).get("model", {})
        if model.get("type") == "BPE" and not model.get("merges"):
            _SPLITS[tokenizer] = "anywhere"
        elif backend.pre_tokenizer is not None and len(backend.pre_tokenizer.pre_tokenize_str("ab cd ef")) >= 3:
            _SPLITS[tokenizer] = "pre-tokens"
        else:
            _SPLITS[tokenizer] = "never"
    how = _SPLITS[tokenizer]
    if how == "never":
        return []
    pre = tokenizer.backend_tokenizer.pre_tokenizer
    cuts, pos = [], _PIECE
    while pos < len(text) - _PIECE:
        i = text.find(" ", pos, pos + _PIECE)
        while i > 0 and not (text[i - 1].isascii() and text[i - 1].isalnum() and text[i + 1: i + 2].isascii()
                             and text[i + 1: i + 2].isalnum()):
            i = text.find(" ", i + 1, pos + _PIECE)
        if i <= 0:
            pos += _PIECE
            continue
        if how == "pre-tokens":  # a pre-token must start at the cut (local context decides the split)
            window = text[i - 32: i + 32]
            if not any(start == 32 for _, (start, _) in pre.pre_tokenize_str(window)):
                pos = i + 1
                continue
        cuts.append(i)
        pos = i + _PIECE
    return cuts


def _masked(tokenizer: PreTrainedTokenizerBase, items: list[tuple[str, list[tuple[int, int]]]]) -> list[ArrayExample]:
    """Tokenize each text once; the mask marks every token overlapping a trained character span."""
    backend = getattr(tokenizer, "backend_tokenizer", None) if tokenizer.is_fast else None
    if backend is None:  # slow tokenizer: no offsets, so tokenize the spans apart (boundaries may differ a bit)
        return [_masked_by_pieces(tokenizer, text, spans) for text, spans in items]
    out = []
    for (text, spans), enc in zip(items, backend.encode_batch([t for t, _ in items], add_special_tokens=False)):
        ids = np.asarray(enc.ids, dtype=np.int32)
        mask = np.zeros(len(ids), dtype=np.uint8)
        for a, b in spans:
            lo, hi = _token_range(enc, len(ids), len(text), a, b)
            mask[lo:hi] = 1
        out.append((ids, mask))
    return out


def _token_range(enc, n_tokens: int, n_chars: int, a: int, b: int) -> tuple[int, int]:
    """Tokens overlapping characters ``[a, b)``: from the token holding ``a`` to the last one starting before ``b``."""
    lo = None
    for pos in range(a, b):  # characters no token covers (a normaliser dropped them) are skipped
        lo = enc.char_to_token(pos)
        if lo is not None:
            break
    if lo is None:
        return 0, 0
    hi = None
    for pos in range(b, n_chars):
        t = enc.char_to_token(pos)
        if t is not None:
            hi = t + 1 if enc.token_to_chars(t)[0] < b else t  # a token straddling b is in
            break
    return lo, n_tokens if hi is None else hi


def _masked_by_pieces(tokenizer, text: str, spans: list[tuple[int, int]]) -> ArrayExample:
    ids, mask, pos = [], [], 0
    for a, b in sorted(spans) + [(len(text), len(text))]:
        for piece, m in ((text[pos:a], 0), (text[a:b], 1)):
            if piece:
                got = _encode(tokenizer, piece)
                ids += got
                mask += [m] * len(got)
        pos = b
    return np.asarray(ids, dtype=np.int32), np.asarray(mask, dtype=np.uint8)


# ----------------------------------------------------------------------------- chat templates
def _apply(tokenizer, messages, add_generation_prompt: bool, tools, template_kwargs: dict, where: str | None) -> str:
    """``apply_chat_template`` to text; template errors become one-line :class:`DataError`s."""
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                             add_generation_prompt=add_generation_prompt, **template_kwargs)
    except TemplateError as exc:
        roles = ", ".join(m.get("role", "?") for m in messages)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"{where + ': ' if where else ''}the chat template rejects this conversation (roles: "
                        f"{roles}): {first}") from exc
    except ValueError as exc:  # e.g. no chat template at all
        raise DataError(f"{where + ': ' if where else ''}cannot apply the chat template: "
                        f"{str(exc).splitlines()[0]}") from exc


@dataclass
class _Skeleton:
    """The sentinel rendering of one conversation shape, split into the fixed text around the contents."""

    pieces: list[str]  # fixed text: pieces[0] S pieces[1] S ... pieces[-1]
    order: list[int]  # message index of each sentinel occurrence, in text order
    starts: dict[int, tuple[int, int]]  # trained message -> (piece index, offset in it) where its span starts
    tails: dict[int, int]  # trained message -> characters of the piece after it that are trained (end of turn)


class _ChatRenderer:
    """Chat rendering and trained spans for one tokenizer + template + template kwargs (caches shapes)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, template_kwargs: dict):
        self.tok = tokenizer
        self.kwargs = template_kwargs
        added = {str(t) for t in tokenizer.added_tokens_decoder.values()}
        added |= {t for t in tokenizer.all_special_tokens if t}
        self.added = sorted(added, key=len, reverse=True)
        self.skeletons: dict[str, _Skeleton | None] = {}
        self._eot: set[str] | None = None

    # -- public
    def chat(self, record: dict, where: str) -> tuple[str, list[tuple[int, int]]]:
        """The rendered text of a chat record and its trained ``(start, end)`` character spans."""
        msgs, tools = record["messages"], record.get("tools")
        text = _apply(self.tok, msgs, False, tools, self.kwargs, where)
        want = [k for k, m in enumerate(msgs) if trained(m)]
        if not want:
            return text, []
        if any(_SENTINEL_RE.search(m["content"]) for m in msgs):
            raise DataError(f"{where}: a message contains moecraft's sentinel text '@@MOECRAFT<n>@@'")
        spans = self._fast(msgs, tools, want, text)
        if spans is None:
            spans = [self._slow(msgs, tools, k, text, where) for k in want]
        return text, spans

    # -- end-of-turn markers
    def eot(self) -> set[str]:
        """Added tokens a template puts right after an assistant message (``<|im_end|>``, ``<|eot_id|>``...)."""
        if self._eot is None:
            found: set[str] = set()
            for probe in (["user", "assistant", "user", "assistant"],
                          ["system", "user", "assistant", "user", "assistant"]):
                msgs = [{"role": r, "content": _SENTINEL.format(k)} for k, r in enumerate(probe)]
                try:
                    text = _apply(self.tok, msgs, False, None, self.kwargs, None)
                except DataError:
                    continue
                for m in _SENTINEL_RE.finditer(text):
                    if probe[int(m.group(1))] == "assistant":
                        tok = self._added_at(text, m.end())
                        if tok:
                            found.add(tok)
            self._eot = found
        return self._eot

    def _added_at(self, text: str, pos: int) -> str | None:
        """The added token starting at ``pos`` after optional whitespace, if any."""
        rest = text[pos:pos + 200].lstrip()
        return next((t for t in self.added if rest.startswith(t)), None)

    def _tail(self, after: str) -> int:
        """Characters of ``after`` (what follows a message's content) up to and including its end-of-turn token."""
        best = None
        for t in self.eot():
            i = after.find(t)
            if i >= 0 and (best is None or i < best[0]):
                best = (i, len(t))
        return 0 if best is None else best[0] + best[1]

    # -- one rendering per record: the cached sentinel skeleton of its shape
    def _fast(self, msgs, tools, want, text) -> list[tuple[int, int]] | None:
        shape = [{k: v for k, v in m.items() if k != "content"} for m in msgs]
        key = json.dumps([shape, tools], sort_keys=True, default=str)
        if key not in self.skeletons:
            if len(self.skeletons) >= 4096:  # records of many shapes (tool calls): keep memory bounded
                self.skeletons.clear()
            self.skeletons[key] = self._skeleton(msgs, tools, want)
        sk = self.skeletons[key]
        if sk is None:
            return None
        # parse: text = pieces[0] X0 pieces[1] X1 ... where each X is the content or the content stripped
        pos, piece_at = 0, []
        for j, k in enumerate(sk.order + [None]):
            if not text.startswith(sk.pieces[j], pos):
                return None
            piece_at.append(pos)
            pos += len(sk.pieces[j])
            if k is None:
                break
            content, nxt = msgs[k]["content"], sk.pieces[j + 1]
            for x in (content, content.strip()):
                if text.startswith(x, pos) and text.startswith(nxt, pos + len(x)):
                    pos += len(x)
                    break
            else:
                return None
        if pos != len(text):
            return None
        spans = []
        for k in want:
            (p, off), j = sk.starts[k], sk.order.index(k)
            end_piece = j + 1
            spans.append((piece_at[p] + off, piece_at[end_piece] + sk.tails[k]))
        return spans

    def _skeleton(self, msgs, tools, want) -> _Skeleton | None:
        sent = [{**m, "content": _SENTINEL.format(k)} for k, m in enumerate(msgs)]
        try:
            full = _apply(self.tok, sent, False, tools, self.kwargs, None)
        except DataError:
            return None
        found = list(_SENTINEL_RE.finditer(full))
        order = [int(m.group(1)) for m in found]
        if any(order.count(k) != 1 for k in want):  # a trained message dropped or repeated by the template
            return None
        pieces = [full[: found[0].start()] if found else full]
        bounds = [0]  # start of each piece in the skeleton text
        for j, m in enumerate(found):
            bounds.append(m.end())
            pieces.append(full[m.end(): found[j + 1].start() if j + 1 < len(found) else len(full)])
        starts, tails = {}, {}
        for k in want:
            j = order.index(k)
            begin = found[j].start()  # the content's own start
            if msgs[k]["role"] == "assistant":
                g = self._generation_start(sent, k, tools, full)
                if g is not None and bounds[j] <= g <= begin:
                    begin = g
            starts[k] = (j, begin - bounds[j])
            tails[k] = self._tail(pieces[j + 1])
        return _Skeleton(pieces, order, starts, tails)

    def _generation_start(self, msgs, k, tools, full) -> int | None:
        """Where the model's own output for assistant message ``k`` starts in ``full``: after the generation
        prompt, when rendering ``msgs[:k]`` with it gives a prefix of ``full`` (else the common prefix)."""
        if k == 0:
            return None
        try:
            prompt = _apply(self.tok, msgs[:k], True, tools, self.kwargs, None)
            bare = _apply(self.tok, msgs[:k], False, tools, self.kwargs, None)
        except DataError:
            return None
        if full.startswith(prompt):
            return len(prompt)
        if not full.startswith(bare):
            return None
        n = len(bare)  # the template's header differs from its generation prompt: keep what they share
        while n < len(prompt) and n < len(full) and prompt[n] == full[n]:
            n += 1
        return n

    # -- per message: templates whose rendering depends on the content
    def _slow(self, msgs, tools, k, text, where) -> tuple[int, int]:
        try:
            return self._content_span(msgs, tools, k, text, where)
        except DataError:
            m = msgs[k]
            if m["role"] != "assistant" or not m.get("tool_calls") or m["content"].strip():
                raise
            return self._tool_call_turn(msgs, k, tools, text, where)

    def _content_span(self, msgs, tools, k, text, where) -> tuple[int, int]:
        sent = [dict(m) for m in msgs]
        sent[k]["content"] = _SENTINEL.format(k)
        probe = _apply(self.tok, sent, False, tools, self.kwargs, where)
        hits = [m for m in _SENTINEL_RE.finditer(probe) if int(m.group(1)) == k]
        role = msgs[k]["role"]
        if len(hits) != 1:
            raise DataError(f"{where}: the chat template renders messages[{k}] ({role}) {len(hits)} times, so "
                            "its tokens cannot be told apart for the loss mask")
        before, after = probe[: hits[0].start()], probe[hits[0].end():]
        if not text.endswith(after):
            raise DataError(f"{where}: the chat template renders what follows messages[{k}] ({role}) differently "
                            "depending on its content; cannot find its end for the loss mask")
        end = len(text) - len(after)
        start = self._generation_start(msgs, k, tools, text) if role == "assistant" else None
        if start is None:
            start = 0
            while start < len(before) and start < end and before[start] == text[start]:
                start += 1
        content = msgs[k]["content"].strip()
        if not content and start is not None and start >= end:
            # no content to find (e.g. a turn of tool calls only): the turn runs to its end-of-turn token
            span = (start, start + self._tail(text[start:]))
            _check_tool_calls(msgs[k], text[span[0]:span[1]], k, where)
            return span
        if start > end or (content and not text[start:end].rstrip().endswith(content[-1])):
            raise DataError(f"{where}: cannot locate messages[{k}] ({role}) in the chat template's rendering; "
                            "the loss mask would be wrong")
        return start, end + self._tail(after)


    def _tool_call_turn(self, msgs, k, tools, text, where) -> tuple[int, int]:
        """An assistant turn of tool calls without content that the content path cannot place (GPT-OSS renders
        an empty analysis message in its content slot, or leaves the slot out when a final answer follows):
        it starts after the generation prompt and ends where rendering the conversation up to it ends, both
        checked to be prefixes of the whole rendering."""
        start = self._generation_start(msgs, k, tools, text)
        try:
            upto = _apply(self.tok, msgs[: k + 1], False, tools, self.kwargs, where)
        except DataError:
            upto = None
        if start is None or upto is None or not text.startswith(upto) or len(upto.rstrip()) <= start:
            raise DataError(f"{where}: cannot locate the tool calls of messages[{k}] (assistant) in the chat "
                            "template's rendering; the loss mask would be wrong")
        span = (start, len(upto.rstrip()))  # up to the template's own end marker (<|call|>), not the newline after
        _check_tool_calls(msgs[k], text[span[0]:span[1]], k, where)
        return span


def _check_tool_calls(message: dict, span_text: str, k: int, where: str | None) -> None:
    """Every tool call of a trained turn must be in its span: GPT-OSS's template renders only the first call of
    a message, and training on a turn with calls silently missing would teach the wrong action."""
    names = [(c.get("function") or c).get("name") for c in message.get("tool_calls") or [] if isinstance(c, dict)]
    for name in set(n for n in names if isinstance(n, str)):
        if span_text.count(name) < names.count(name):
            raise DataError(f"{where}: the chat template does not render every tool call of messages[{k}] "
                            f"(assistant): {name!r} is called {names.count(name)} times, rendered "
                            f"{span_text.count(name)}; split the calls into one assistant turn each")


_RENDERERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _renderer(tokenizer: PreTrainedTokenizerBase, template_kwargs: dict) -> _ChatRenderer:
    per_tok = _RENDERERS.setdefault(tokenizer, {})
    key = (tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else json.dumps(tokenizer.chat_template),
           json.dumps(template_kwargs, sort_keys=True, default=str))
    if key not in per_tok:
        per_tok[key] = _ChatRenderer(tokenizer, template_kwargs)
    return per_tok[key]


def template_options(text: str | None) -> dict:
    """``--chat-template-kwargs``: a JSON object (a YAML mapping arrives as its Python text) -> dict."""
    import ast

    from moecraft.config import ConfigError

    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = None
    if not isinstance(value, dict):
        raise ConfigError(f"option 'chat_template_kwargs' expects a JSON object such as "
                          f"'{{\"enable_thinking\": false}}', got {text!r}")
    return value


def early_tokenizer(model: str) -> PreTrainedTokenizerBase | None:
    """The tokenizer of ``model`` without its weights, so data can be rendered (and its errors raised) before
    the model loads; ``None`` when that fails, leaving the error to the model loader, which names it better."""
    from moecraft.models import TINY_PREFIX, load_tokenizer

    path = Path(model).expanduser()
    if not model.startswith(TINY_PREFIX) and not (path / "config.json").is_file():
        return None  # hub ids and bad paths: the loader checks them first
    try:
        return load_tokenizer(model)
    except Exception:  # noqa: BLE001 - any failure here is reported by load_model with the folder named
        return None
