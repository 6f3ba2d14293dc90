"""Write examples/data/math_word_problems.jsonl: short math word problems with exact answers.

    python examples/make_math_problems.py [--num 400] [--seed 0] [--out examples/data/math_word_problems.jsonl]

Each problem comes from a template with random numbers; its answer is computed exactly (integers, or fractions
via `fractions.Fraction`, written `\\frac{p}{q}` so math-verify reads it). Numbers are drawn so that every
intermediate result is exact (whole items, whole prices, fractions of wholes that divide evenly).

Columns: prompt (the R1-Zero think/answer template around the question, `fastrl.rewards.r1_zero_prompt`),
question, solution, difficulty (1 = one operation ... 4 = several steps or an equation), kind (the template).
Questions are at most MAX_QUESTION_CHARS characters, so that with the template a prompt stays under 480
characters: the built-in tiny model (one token per character, 512 positions) can run the example end to end.

The output is deterministic for a given --num and --seed; tests/test_math_example.py regenerates it and checks
that it matches the shipped file, and re-derives every answer from the question's text.
"""
from __future__ import annotations

import argparse
import json
import os
import random
from fractions import Fraction
from typing import Callable

from fastrl.rewards import r1_zero_prompt

MAX_QUESTION_CHARS = 95
NAMES = ["Mia", "Leo", "Ana", "Tom", "Sara", "Ben", "Ivy", "Max", "Zoe", "Sam", "Eli", "Ada"]
ITEMS = ["apples", "pens", "books", "cards", "shells", "stamps", "eggs", "marbles", "beads", "coins"]


# ------------------------------------------------------------------ templates: rng -> (question, answer)
def add_more(rng: random.Random) -> tuple[str, Fraction]:
    name, item, a, b = rng.choice(NAMES), rng.choice(ITEMS), rng.randint(3, 60), rng.randint(2, 40)
    return f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?", Fraction(a + b)


def give_away(rng: random.Random) -> tuple[str, Fraction]:
    name, item, b = rng.choice(NAMES), rng.choice(ITEMS), rng.randint(2, 30)
    a = rng.randint(b + 1, 80)
    return f"{name} had {a} {item} and gave away {b}. How many {item} are left?", Fraction(a - b)


def boxes(rng: random.Random) -> tuple[str, Fraction]:
    item, per_box, n = rng.choice(ITEMS), rng.randint(3, 12), rng.randint(2, 15)
    return f"A box holds {per_box} {item}. How many {item} are in {n} boxes?", Fraction(per_box * n)


def share(rng: random.Random) -> tuple[str, Fraction]:
    item, kids, each = rng.choice(ITEMS), rng.randint(2, 9), rng.randint(2, 12)
    return f"{kids * each} {item} are shared equally by {kids} kids. How many does each kid get?", Fraction(each)


def shopping(rng: random.Random) -> tuple[str, Fraction]:
    name, n, price, extra = rng.choice(NAMES), rng.randint(2, 9), rng.randint(2, 15), rng.randint(1, 20)
    return (f"{name} buys {n} books at ${price} each and a bag for ${extra}. How many dollars in all?",
            Fraction(n * price + extra))


def change(rng: random.Random) -> tuple[str, Fraction]:
    name, n, price = rng.choice(NAMES), rng.randint(2, 8), rng.randint(2, 12)
    paid = rng.choice([p for p in (20, 50, 100) if p >= n * price] or [100])
    return (f"{name} pays ${paid} for {n} toys at ${price} each. How many dollars of change?",
            Fraction(paid - n * price))


def fraction_of(rng: random.Random) -> tuple[str, Fraction]:
    den = rng.choice([2, 3, 4, 5, 8, 10])
    num = rng.randint(1, den - 1)
    whole = den * rng.randint(2, 12)
    return f"A tank holds {whole} liters and is {num}/{den} full. How many liters are in it?", \
        Fraction(num, den) * whole


def fractions_together(rng: random.Random) -> tuple[str, Fraction]:
    a, b = rng.sample([2, 3, 4, 5, 6, 8], 2)
    n1, n2 = rng.choice(NAMES[:6]), rng.choice(NAMES[6:])
    return f"{n1} ate 1/{a} of a pie and {n2} ate 1/{b} of it. What fraction of the pie did they eat?", \
        Fraction(1, a) + Fraction(1, b)


def discount(rng: random.Random) -> tuple[str, Fraction]:
    percent = rng.choice([10, 20, 25, 50, 75])
    price = rng.randint(2, 20) * 20  # a multiple of 20: every listed percent of it is whole
    return f"A coat costs ${price}. It is {percent}% off. What is the new price in dollars?", \
        Fraction(price) * (100 - percent) / 100


def speed(rng: random.Random) -> tuple[str, Fraction]:
    kmh, halves = rng.choice([40, 50, 60, 80, 90]), rng.randint(2, 9)
    hours = Fraction(halves, 2)
    shown = f"{halves // 2}.5" if halves % 2 else str(halves // 2)
    return f"A train goes {kmh} km per hour for {shown} hours. How many km does it go?", kmh * hours


def ages(rng: random.Random) -> tuple[str, Fraction]:
    n1, n2 = rng.sample(NAMES, 2)
    times, young, years = rng.randint(2, 5), rng.randint(2, 12), rng.randint(1, 10)
    return (f"{n1} is {times} times as old as {n2}, who is {young}. What is the sum of their ages in {years} years?",
            Fraction(times * young + young + 2 * years))


def think_of_number(rng: random.Random) -> tuple[str, Fraction]:
    x, times, plus = rng.randint(2, 30), rng.randint(2, 9), rng.randint(1, 40)
    return f"I think of a number, multiply it by {times} and add {plus}. I get {x * times + plus}. What is it?", \
        Fraction(x)


# kind -> (template, difficulty)
TEMPLATES: dict[str, tuple[Callable[[random.Random], tuple[str, Fraction]], int]] = {
    "add_more": (add_more, 1), "give_away": (give_away, 1), "boxes": (boxes, 1), "share": (share, 2),
    "shopping": (shopping, 2), "change": (change, 2), "fraction_of": (fraction_of, 3),
    "fractions_together": (fractions_together, 3), "discount": (discount, 3), "speed": (speed, 3),
    "ages": (ages, 4), "think_of_number": (think_of_number, 4),
}


# ------------------------------------------------------------------ the data set
def latex(answer: Fraction) -> str:
    """An exact answer as math-verify reads it: '42', '-3' or '\\frac{7}{12}'."""
    if answer.denominator == 1:
        return str(answer.numerator)
    return f"\\frac{{{answer.numerator}}}{{{answer.denominator}}}"


def make_problems(num: int, seed: int = 0) -> list[dict]:
    """`num` distinct problems, the templates taken in turn, in a seeded order."""
    if num < 1:
        raise ValueError(f"num must be >= 1, got {num}")
    rng, seen, rows = random.Random(seed), set(), []
    kinds = list(TEMPLATES)
    attempts = 0
    while len(rows) < num:
        attempts += 1
        if attempts > 100 * num:
            raise ValueError(f"num={num}: the templates cannot make that many distinct problems")
        kind = kinds[len(rows) % len(kinds)]
        template, difficulty = TEMPLATES[kind]
        question, answer = template(rng)
        if question in seen:
            continue
        if len(question) > MAX_QUESTION_CHARS:
            raise ValueError(f"template {kind!r} wrote a {len(question)}-character question: {question!r}")
        seen.add(question)
        rows.append({"prompt": r1_zero_prompt(question), "question": question, "solution": latex(answer),
                     "difficulty": difficulty, "kind": kind})
    return rows


def to_jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=True) + "\n" for r in rows)


def main(argv: list[str] | None = None) -> int:
    here = os.path.dirname(os.path.abspath(__file__))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=os.path.join(here, "data", "math_word_problems.jsonl"))
    args = parser.parse_args(argv)
    rows = make_problems(args.num, args.seed)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(to_jsonl(rows))
    print(f"wrote {len(rows)} problems to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
