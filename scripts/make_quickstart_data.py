"""Writes recipes/data/quickstart/people.jsonl: sentences about people -> one-line JSON records.

SmolLM2-135M-Instruct answers these in prose or malformed JSON (near 0% exact match); a few minutes of QLoRA on CPU
teach it the exact format. Deterministic: re-running writes the same file.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quickstart_people import random_person  # noqa: E402  (scripts/ is not a package)

INSTRUCTION = "Extract name, age, city and job from the text as one line of JSON.\nText: "


def make_rows(count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        person, text = random_person(rng)
        rows.append({"messages": [
            {"role": "user", "content": INSTRUCTION + text},
            {"role": "assistant", "content": json.dumps(person)},
        ]})
    return rows


def main() -> None:
    out = Path(__file__).resolve().parents[1] / "recipes" / "data" / "quickstart" / "people.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(row) + "\n" for row in make_rows(600, seed=0)))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
