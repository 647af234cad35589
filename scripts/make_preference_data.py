"""Writes recipes/data/quickstart/people_preferences.jsonl: the quickstart's sentences about people as preference
pairs. Chosen: the compact one-line JSON with the right keys. Rejected: what small models tend to write instead,
verbose prose, JSON with other keys, or pretty-printed JSON in a code fence (a third each).

SmolLM2-135M-Instruct prefers the rejected styles; a few minutes of DPO on CPU turn that around on held-out pairs.
Deterministic: re-running writes the same file. `method: kto` trains on the same file (pairs are unpaired).
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quickstart_people import random_person  # noqa: E402  (scripts/ is not a package)

INSTRUCTION = "Extract name, age, city and job from the text as one line of JSON.\nText: "

WRONG_KEYS = {"name": "full_name", "age": "years", "city": "location", "job": "occupation"}


def rejected_answer(person: dict, style: int) -> str:
    if style == 0:
        return (f"Sure! Here is the information from the text: the person's name is {person['name']}, they are "
                f"{person['age']} years old, they live in {person['city']} and they work as a {person['job']}.")
    if style == 1:
        return json.dumps({WRONG_KEYS[key]: value for key, value in person.items()})
    return "```json\n" + json.dumps(person, indent=2) + "\n```"


def make_pairs(count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        person, text = random_person(rng)
        rows.append({"prompt": INSTRUCTION + text, "chosen": json.dumps(person),
                     "rejected": rejected_answer(person, i % 3)})
    return rows


def main() -> None:
    out = Path(__file__).resolve().parents[1] / "recipes" / "data" / "quickstart" / "people_preferences.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(row) + "\n" for row in make_pairs(400, seed=1)))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
