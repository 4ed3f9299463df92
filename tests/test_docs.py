"""The front page and the reference pages: the README stays a front page (≤ 350 lines, the set-up commands in
its first 20), and every link and anchor in it and in docs/*.md resolves (a moved section breaks no link)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "docs" / "runs" / "README.md"]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped (but - and _), spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    out, in_code = set(), False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and line.startswith("#"):
            out.add(slug(line.lstrip("#")))
    return out


def links(page: Path) -> list[str]:
    out, in_code = [], False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code:
            out += [m.group(1) for m in LINK.finditer(line.replace("``", ""))]
    return out


def test_slug_is_githubs():
    assert slug("Equal-budget comparison: `make compare`") == "equal-budget-comparison-make-compare"
    assert slug("bf16 fidelity") == "bf16-fidelity"


def test_the_readme_is_a_front_page():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 350
    assert any("make setup" in line for line in lines[:20])


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_link_and_anchor_resolves(page):
    broken = []
    for target in links(page):
        if re.match(r"[a-z]+://|mailto:", target):
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no file {dest}")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading #{anchor} in {dest.name}")
    assert not broken, broken


def test_a_broken_anchor_is_seen(tmp_path):
    page = tmp_path / "a.md"
    page.write_text("# Title\n\nSee [b](#nope) and [c](#title).\n")
    assert links(page) == ["#nope", "#title"] and anchors(page) == {"title"}
