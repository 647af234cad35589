"""Regenerates the recipe reference table in README.md from the recipe dataclasses."""

from __future__ import annotations

import re
from pathlib import Path

from qlora_kit.recipe import recipe_reference

START, END = "<!-- recipe-reference:start -->", "<!-- recipe-reference:end -->"


def updated_readme(text: str) -> str:
    pattern = re.compile(re.escape(START) + ".*?" + re.escape(END), re.S)
    return pattern.sub(lambda _: f"{START}\n{recipe_reference()}\n{END}", text)


def main() -> None:
    path = Path(__file__).resolve().parents[1] / "README.md"
    path.write_text(updated_readme(path.read_text()))
    print(f"updated {path}")


if __name__ == "__main__":
    main()
