"""pyproject.toml's dependency ranges describe what the tests run on: the libraries installed here must lie inside
them, or the suite is testing a combination no user of the package can install."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest
from packaging.requirements import Requirement

tomllib = pytest.importorskip("tomllib")  # Python 3.11+; 3.10 has no TOML reader of its own

ROOT = Path(__file__).resolve().parent.parent


def outside_ranges(requirements: list[str]) -> list[str]:
    """Each installed requirement whose version its range does not allow (missing ones are pip's business)."""
    wrong = []
    for text in requirements:
        requirement = Requirement(text)
        try:
            installed = version(requirement.name)
        except PackageNotFoundError:
            continue
        if not requirement.specifier.contains(installed, prereleases=True):
            wrong.append(f"{requirement.name} {installed} (pyproject.toml allows {requirement.specifier})")
    return wrong


def test_installed_libraries_lie_inside_the_declared_ranges():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    assert not (wrong := outside_ranges(requirements)), (
        "tested against versions pyproject.toml does not allow: " + "; ".join(wrong) + ". Widen the range only once "
        "CI and the GPU tests pass on the new version")


def test_range_check_reports_a_version_outside_its_range():
    assert outside_ranges(["torch<1", "not-a-real-package-xyz>=1"]) == [
        f"torch {version('torch')} (pyproject.toml allows <1)"]
