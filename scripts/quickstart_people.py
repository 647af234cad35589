"""The people the quickstart data scripts write about: the SFT, preference and GRPO quickstarts share them, so one
task runs through SFT -> DPO -> GRPO. Imports no other script (tests/test_scripts.py)."""

from __future__ import annotations

import random

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


def random_person(rng: random.Random) -> tuple[dict, str]:
    """A person's record and a sentence about them, drawn in a fixed order so the data files stay the same."""
    person = {"name": f"{rng.choice(FIRST)} {rng.choice(LAST)}", "age": rng.randint(19, 79),
              "city": rng.choice(CITIES), "job": rng.choice(JOBS)}
    return person, rng.choice(TEMPLATES).format(**person)
