"""Regenerates docs/recipe-reference.md from the recipe dataclasses (tests/test_docs.py checks it is up to date)."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "docs" / "recipe-reference.md"
COMMAND = "python scripts/update_recipe_reference.py"


def reference_document() -> str:
    """The whole of docs/recipe-reference.md: a short header and the generated table."""
    sys.path.insert(0, str(ROOT))
    from qlora_kit.recipe import recipe_reference

    return (f"# Recipe reference\n\nEvery recipe key, generated from the dataclasses in `qlora_kit/recipe.py` by "
            f"`{COMMAND}`;\n`tests/test_docs.py` fails when this file and the dataclasses differ. Measurements of "
            "the `speed.*` keys are in\n[benchmarks.md](benchmarks.md).\n\n" + recipe_reference() + "\n")


def main() -> None:
    partial = REFERENCE.with_suffix(".md.partial")
    partial.write_text(reference_document())
    partial.replace(REFERENCE)
    print(f"updated {REFERENCE}")


if __name__ == "__main__":
    main()
