"""Writes chat_sample.jsonl beside this file: 200 short made-up conversations (sums, reversed words, upper case,
counting letters; some with a system message, some of two turns) for `recipes/hf_sft_lora.yaml`. Deterministic:
`python recipes/data/make_chat_sample.py` writes the same file again."""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = [
    "apple",
    "river",
    "stone",
    "cloud",
    "tiger",
    "lemon",
    "castle",
    "pencil",
    "garden",
    "window",
    "rocket",
    "silver",
    "candle",
    "forest",
    "violin",
]
SYSTEMS = ["You are a helpful assistant.", "Answer briefly.", "You answer in one sentence."]


def question(rng: random.Random) -> tuple[str, str]:
    kind = rng.randrange(4)
    if kind == 0:
        a, b = rng.randrange(50), rng.randrange(50)
        return f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."
    word = rng.choice(WORDS)
    if kind == 1:
        return f"Spell '{word}' backwards.", f"'{word}' backwards is '{word[::-1]}'."
    if kind == 2:
        return f"Write '{word}' in capital letters.", f"{word.upper()}"
    letter = rng.choice(sorted(set(word)))
    n = word.count(letter)
    return f"How many times does '{letter}' appear in '{word}'?", f"'{letter}' appears {n} time{'s' * (n != 1)}."


def conversation(rng: random.Random) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": rng.choice(SYSTEMS)}] if rng.random() < 0.3 else []
    for _ in range(2 if rng.random() < 0.25 else 1):
        prompt, answer = question(rng)
        messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
    return messages


def main() -> None:
    rng = random.Random(0)
    rows = [json.dumps({"messages": conversation(rng)}) + "\n" for _ in range(200)]
    (Path(__file__).parent / "chat_sample.jsonl").write_text("".join(rows))


if __name__ == "__main__":
    main()
