"""Writes recipes/data/quickstart-grpo/{train,held_out}.jsonl: a verifiable task for GRPO.

Each row is a sentence about a person (the SFT quickstart's sentences, scripts/make_quickstart_data.py) with a prompt
asking for one line of JSON with the keys name, age, city and job, and the true record in the `answer` column, which
the rewards compare with. The held-out file uses another seed, so its people are new to the model. Deterministic:
re-running writes the same files.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quickstart_people import random_person  # noqa: E402  (scripts/ is not a package)

INSTRUCTION = ('Reply with one line of JSON and nothing else, with exactly these keys: "name" (string), "age" '
               '(number), "city" (string), "job" (string).\nText: ')


def make_rows(count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        person, text = random_person(rng)
        rows.append({"prompt": INSTRUCTION + text, "answer": json.dumps(person)})
    return rows


def main() -> None:
    out = Path(__file__).resolve().parents[1] / "recipes" / "data" / "quickstart-grpo"
    out.mkdir(parents=True, exist_ok=True)
    for name, count, seed in (("train.jsonl", 400, 1), ("held_out.jsonl", 16, 2)):
        (out / name).write_text("".join(json.dumps(row) + "\n" for row in make_rows(count, seed)))
        print(f"wrote {out / name}")


if __name__ == "__main__":
    main()
