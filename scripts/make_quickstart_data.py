"""Writes recipes/data/quickstart/people.jsonl: sentences about people -> one-line JSON records.

SmolLM2-135M-Instruct answers these in prose or malformed JSON (near 0% exact match); a few minutes of QLoRA on CPU
teach it the exact format. Deterministic: re-running writes the same file.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

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
INSTRUCTION = "Extract name, age, city and job from the text as one line of JSON.\nText: "


def make_rows(count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        person = {"name": f"{rng.choice(FIRST)} {rng.choice(LAST)}", "age": rng.randint(19, 79),
                  "city": rng.choice(CITIES), "job": rng.choice(JOBS)}
        text = rng.choice(TEMPLATES).format(**person)
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
