"""The documentation stays true and short: the recipe reference matches the dataclasses, the README fits a newcomer's
five minutes, and every relative link points at a file (and heading) that exists."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README_LIMIT = 15_000
LINKED_DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "recipes" / "README.md"]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def github_anchor(heading: str) -> str:
    """The id GitHub gives a markdown heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = FENCE.sub("", path.read_text())
    return {github_anchor(line.lstrip("#")) for line in text.splitlines() if line.startswith("#")}


def relative_links(path: Path) -> list[str]:
    """Link targets outside code blocks that are not web addresses."""
    text = FENCE.sub("", path.read_text())
    return [target for target in LINK.findall(text) if not re.match(r"[a-z]+:", target)]


def test_recipe_reference_document_matches_the_dataclasses():
    sys.path.insert(0, str(ROOT / "scripts"))
    from update_recipe_reference import COMMAND, REFERENCE, reference_document

    assert REFERENCE.is_file(), f"{REFERENCE} is missing: run {COMMAND}"
    assert REFERENCE.read_text() == reference_document(), (
        f"docs/recipe-reference.md differs from the recipe dataclasses in qlora_kit/recipe.py: run {COMMAND}")


def test_readme_stays_short_enough_to_read_in_five_minutes():
    size = len((ROOT / "README.md").read_text())
    assert size <= README_LIMIT, (
        f"README.md has {size:,} characters (limit {README_LIMIT:,}): move measurements and detail to docs/")


def broken_links(document: Path) -> list[str]:
    """Each relative link of `document` whose file, or heading in a markdown file, does not exist."""
    broken = []
    for target in relative_links(document):
        file_part, _, anchor = target.partition("#")
        linked = (document.parent / file_part).resolve() if file_part else document
        if not linked.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"{target} (no heading '{anchor}' in {linked.name})")
    return broken


@pytest.mark.parametrize("document", LINKED_DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves_to_an_existing_file_and_heading(document):
    assert not (broken := broken_links(document)), f"{document.relative_to(ROOT)}: broken links: {', '.join(broken)}"


def test_link_check_catches_a_missing_file_and_a_missing_heading(tmp_path):
    """The checker itself can fail: a link to a file that does not exist and one to an unknown heading; web
    addresses and links inside code blocks are not followed."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "other.md").write_text("# Several GPUs\n")
    page = tmp_path / "page.md"
    page.write_text("[a](docs/other.md#several-gpus) [b](gone.md) [c](docs/other.md#nope) [d](https://x.org/y)\n"
                    "```\n[e](inside-code.md)\n```\n")
    assert broken_links(page) == ["gone.md (no such file)", "docs/other.md#nope (no heading 'nope' in other.md)"]
