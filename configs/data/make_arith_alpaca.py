"""Writes arith_alpaca.jsonl: 200 synthetic Alpaca-layout examples (instruction / input / output)
for the tiny instruction run. Nothing is downloaded; the file is fully determined by the seed.

Four tasks, drawn uniformly: two-digit addition asked in the instruction (empty input), the same
with the numbers in the input, repeating an input word three times, and spelling it backwards.

    python configs/data/make_arith_alpaca.py   # rewrites configs/data/arith_alpaca.jsonl
"""
import json
import random
from pathlib import Path

WORDS = ("apple river stone cloud tiger paper music orange garden window silver candle forest "
         "rabbit yellow bridge winter ocean pencil dragon").split()


def example(rng: random.Random) -> dict:
    a, b, word = rng.randint(10, 99), rng.randint(10, 99), rng.choice(WORDS)
    return rng.choice([
        {"instruction": f"What is {a} + {b}?", "input": "", "output": str(a + b)},
        {"instruction": "Add the two numbers.", "input": f"{a} and {b}", "output": str(a + b)},
        {"instruction": "Repeat the word three times.", "input": word, "output": " ".join([word] * 3)},
        {"instruction": "Spell the word backwards.", "input": word, "output": word[::-1]},
    ])


if __name__ == "__main__":
    rng = random.Random(0)
    out = Path(__file__).with_name("arith_alpaca.jsonl")
    out.write_text("".join(json.dumps(example(rng)) + "\n" for _ in range(200)))
    print(f"wrote {out}")
