"""Small task data sets that moecraft generates itself, so every command has offline data by default.

Use them anywhere a data source is expected as ``builtin:<task>`` or ``builtin:<task>:<split>``
(split ``train``, the default, or ``eval``). Generation is deterministic: a fixed seed per task and split.

- ``intent``: an English request -> a JSON object with ``intent`` and ``slots`` (the ESFT intent task's
  shape; metric: JSON exact match of intent and slot set).
- ``arithmetic``: a short word problem -> worked answer ending in ``#### <number>`` (GSM8K style).
"""

from __future__ import annotations

import json
import random

from moecraft.errors import DataError

SIZES = {"train": 400, "eval": 100}
_SPLIT_SEED = {"train": 1, "eval": 2}

_CITIES = ["Paris", "Tokyo", "Berlin", "Lima", "Cairo", "Oslo", "Seoul", "Rome", "Dublin", "Quito"]
_DAYS = ["today", "tomorrow", "monday", "friday", "sunday"]
_ROOMS = ["kitchen", "bedroom", "office", "garage", "hall"]
_SONGS = ["jazz", "rock", "lofi", "opera", "blues"]
_NAMES = ["Ana", "Ben", "Chen", "Dara", "Eli", "Femi", "Gus", "Hana"]
_ITEMS = ["apples", "pens", "books", "stamps", "coins", "cards"]


def _intent_example(rng: random.Random) -> tuple[str, dict]:
    kind = rng.randrange(5)
    if kind == 0:
        city, day = rng.choice(_CITIES), rng.choice(_DAYS)
        text = rng.choice(["what is the weather in {c} {d}", "will it rain in {c} {d}", "{c} forecast for {d}"])
        return text.format(c=city, d=day), {"intent": "weather_query", "slots": {"city": city, "date": day}}
    if kind == 1:
        room, state = rng.choice(_ROOMS), rng.choice(["on", "off"])
        text = rng.choice(["turn {s} the {r} lights", "switch the lights in the {r} {s}"])
        return text.format(s=state, r=room), {"intent": "lights_set", "slots": {"room": room, "state": state}}
    if kind == 2:
        genre = rng.choice(_SONGS)
        text = rng.choice(["play some {g}", "put on {g} music", "i want to hear {g}"])
        return text.format(g=genre), {"intent": "play_music", "slots": {"genre": genre}}
    if kind == 3:
        src, dst = rng.sample(_CITIES, 2)
        day = rng.choice(_DAYS)
        text = rng.choice(["book a flight from {a} to {b} {d}", "i need a ticket {a} to {b} for {d}"])
        return text.format(a=src, b=dst, d=day), {
            "intent": "flight_book", "slots": {"from": src, "to": dst, "date": day}}
    minutes = rng.choice([5, 10, 15, 20, 30, 45])
    text = rng.choice(["set a timer for {m} minutes", "remind me in {m} minutes"])
    return text.format(m=minutes), {"intent": "timer_set", "slots": {"minutes": str(minutes)}}


def _arithmetic_example(rng: random.Random) -> tuple[str, str, int]:
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    a, b, c = rng.randint(2, 30), rng.randint(2, 20), rng.randint(2, 9)
    kind = rng.randrange(3)
    if kind == 0:
        q = f"{name} has {a} {item} and buys {b} more. How many {item} does {name} have now?"
        ans = a + b
        work = f"{a} + {b} = {ans}"
    elif kind == 1:
        a = a + b
        q = f"{name} had {a} {item} and gave away {b}. How many {item} are left?"
        ans = a - b
        work = f"{a} - {b} = {ans}"
    else:
        q = f"{name} buys {c} boxes with {b} {item} in each. How many {item} is that?"
        ans = c * b
        work = f"{c} * {b} = {ans}"
    return q, f"{work}\n#### {ans}", ans


def generate(task: str, split: str = "train") -> list[dict]:
    """Records of a built-in task: ``{"messages": [user, assistant], "reference": ...}``."""
    if split not in SIZES:
        raise DataError(f"builtin:{task}: unknown split '{split}'; choose from {sorted(SIZES)}")
    rng = random.Random(f"{task}-{_SPLIT_SEED[split]}")
    records = []
    for _ in range(SIZES[split]):
        if task == "intent":
            text, target = _intent_example(rng)
            prompt = f"Convert the request to JSON with keys intent and slots.\nRequest: {text}"
            answer = json.dumps(target, ensure_ascii=False)
            reference = answer
        elif task == "arithmetic":
            prompt, answer, value = _arithmetic_example(rng)
            reference = str(value)
        else:
            raise DataError(f"unknown built-in task '{task}'; choose from {TASKS}")
        records.append(
            {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}],
             "reference": reference}
        )
    return records


TASKS = ["intent", "arithmetic"]
