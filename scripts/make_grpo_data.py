"""Writes recipes/data/quickstart-grpo/{train,held_out}.jsonl: a verifiable task for GRPO.

Each row is a sentence about a person (the SFT quickstart's sentences, scripts/make_quickstart_data.py) with a prompt
asking for one line of JSON with the keys name, age, city and job, and the true record in the `answer` column, which
the rewards compare with. The held-out file uses another seed, so its people are new to the model. Deterministic:
re-running writes the same files.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

# The people of scripts/make_quickstart_data.py (scripts import no other script, tests/test_scripts.py).
FIRST = ["Maria", "James", "Aiko", "Omar", "Lena", "Carlos", "Priya", "Tom", "Fatima", "Lucas", "Mei", "Noah",
         "Sofia", "Ivan", "Amara", "Ben", "Chloe", "Diego", "Elena", "Farid", "Grace", "Hugo", "Ines", "Jonas",
         "Kira", "Liam", "Nadia", "Oscar", "Paula", "Ravi", "Sara", "Theo", "Uma", "Victor", "Wen", "Yara", "Zoe"]
LAST = ["Lopez", "Smith", "Tanaka", "Haddad", "Becker", "Silva", "Patel", "Brown", "Khan", "Martin", "Chen",
        "Wilson", "Rossi", "Petrov", "Okafor", "Clark", "Dubois", "Garcia", "Novak", "Rahimi", "Kim", "Moreau",
        "Costa", "Berg", "Sato", "Murphy", "Ali", "Nilsson", "Fischer", "Rao", "Cohen", "Weber", "Singh"]
CITIES = ["Madrid", "Boston", "Osaka", "Cairo", "Berlin", "Lisbon", "Mumbai", "Leeds", "Lahore", "Lyon",
          "Taipei", "Denver", "Rome", "Kazan", "Lagos", "Dublin", "Quebec", "Seville", "Prague", "Tehran",
          "Seoul", "Nantes", "Porto", "Oslo", "Kyoto", "Cork", "Dubai", "Malmo", "Munich", "Pune", "Haifa"]
JOBS = ["nurse", "teacher", "pilot", "chef", "engineer", "lawyer", "farmer", "painter", "dentist", "baker",
        "plumber", "writer", "architect", "pharmacist", "carpenter", "librarian", "designer", "mechanic"]
TEMPLATES = [
    "{name}, {age}, works as a {job} in {city}.",
    "{name} is a {age}-year-old {job} living in {city}.",
    "Meet {name}: a {job} from {city}, aged {age}.",
    "In {city}, {name} ({age}) earns a living as a {job}.",
    "{name} lives in {city}, is {age} years old and works as a {job}.",
    "At {age}, {name} is a {job} based in {city}.",
]
INSTRUCTION = ('Reply with one line of JSON and nothing else, with exactly these keys: "name" (string), "age" '
               '(number), "city" (string), "job" (string).\nText: ')


def make_rows(count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        person = {"name": f"{rng.choice(FIRST)} {rng.choice(LAST)}", "age": rng.randint(19, 79),
                  "city": rng.choice(CITIES), "job": rng.choice(JOBS)}
        rows.append({"prompt": INSTRUCTION + rng.choice(TEMPLATES).format(**person), "answer": json.dumps(person)})
    return rows


def main() -> None:
    out = Path(__file__).resolve().parents[1] / "recipes" / "data" / "quickstart-grpo"
    out.mkdir(parents=True, exist_ok=True)
    for name, count, seed in (("train.jsonl", 400, 1), ("held_out.jsonl", 16, 2)):
        (out / name).write_text("".join(json.dumps(row) + "\n" for row in make_rows(count, seed)))
        print(f"wrote {out / name}")


if __name__ == "__main__":
    main()
