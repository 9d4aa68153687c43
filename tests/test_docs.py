"""The docs match the code: the layout sections name every package folder and module, every
``docs/design.md §N`` cited anywhere resolves to a section of that page, and nothing cites the
design notes the project started from (they are not in the repository, so a user cannot read them)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "apq_lightning"
DESIGN_PAGE = ROOT / "docs" / "design.md"

SKIP_DIRS = {".git", ".venv", "runs", "__pycache__", ".pytest_cache", ".ruff_cache", "node_modules", "weights"}
TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".toml", ".txt", ".cfg", ".ini", ".sh"}
TEXT_NAMES = {"Makefile", "run"}

REF = re.compile(r"design\.md((?:\s*[,/]?\s*(?:and\s+)?§\d+(?:\.\d+)*)+)")
SECTION = re.compile(r"§(\d+(?:\.\d+)*)")
HEADING = re.compile(r"^#{2,4} (\d+(?:\.\d+)*)\.?\s", re.M)
OLD_NOTES = re.compile(r"\b" + "DES" + r"IGN(?:\.md\b|\s+§)")  # spelt apart: this file must not match itself


def text_files() -> list[Path]:
    """Every text file of the repository that people or tools read (no virtualenv, runs, caches)."""
    out = []
    for path in ROOT.rglob("*"):
        rel = path.relative_to(ROOT)
        if any(part in SKIP_DIRS or part.endswith(".egg-info") for part in rel.parts[:-1]):
            continue
        if path.is_file() and (path.suffix in TEXT_SUFFIXES or path.name in TEXT_NAMES):
            out.append(path)
    return sorted(out)


def section(text: str, heading: str) -> str:
    """The text under the Markdown heading ``heading`` (a whole line), up to the next heading of
    the same or a higher level; ``""`` if there is no such heading."""
    lines = text.splitlines()
    try:
        start = lines.index(heading)
    except ValueError:
        return ""
    level = len(heading) - len(heading.lstrip("#"))
    body = []
    for line in lines[start + 1 :]:
        hashes = len(line) - len(line.lstrip("#"))
        if 0 < hashes <= level and line[hashes : hashes + 1] == " ":
            break
        body.append(line)
    return "\n".join(body)


def package_folders() -> list[str]:
    """``space/``, ``modules/collection/``, ...: every folder of the package that is a package,
    and the top-level ``callbacks/`` (installed as ``apq_lightning.callbacks``)."""
    inits = [p.parent for p in PACKAGE.rglob("__init__.py") if p.parent != PACKAGE]
    return [*sorted(f"{folder.relative_to(PACKAGE)}/" for folder in inits), "callbacks/"]


def top_level_modules() -> list[str]:
    return sorted(p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py")


def not_named(text: str, names: list[str]) -> list[str]:
    """The names that ``text`` does not contain as a whole path (``collection/`` is not named by
    ``modules/collection/``, nor ``cli.py`` by ``checked_cli.py``)."""
    return [n for n in names if not re.search(r"(?<![\w/.])" + re.escape(n) + r"(?![\w])", text)]


def design_sections() -> set[str]:
    return set(HEADING.findall(DESIGN_PAGE.read_text()))


def cited_sections(text: str) -> list[str]:
    return [s for m in REF.finditer(text) for s in SECTION.findall(m.group(1))]


# ---- the layout sections -----------------------------------------------------------------------
def test_readme_layout_names_every_package_folder_and_module():
    layout = section((ROOT / "README.md").read_text(), "## Layout")
    assert layout, "README.md has no '## Layout' section"
    assert not_named(layout, package_folders()) == []
    assert not_named(layout, top_level_modules()) == []


def test_design_layout_names_every_package_folder_and_module():
    tree = section(DESIGN_PAGE.read_text(), "### 14.1 The tree")
    assert tree, "docs/design.md has no '### 14.1 The tree' section"
    assert not_named(tree, package_folders()) == []
    assert not_named(tree, top_level_modules()) == []


def test_the_layout_check_sees_a_missing_folder():
    """The check above is not vacuous: a layout without one folder or module is caught."""
    folders, modules = package_folders(), top_level_modules()
    assert "modules/collection/" in folders and "collection/" in folders and "callbacks/" in folders
    assert "cli.py" in modules and "checked_cli.py" in modules
    layout = section((ROOT / "README.md").read_text(), "## Layout")
    without = re.sub(r"(?<![\w/])collection/", "", layout)  # keeps modules/collection/
    assert set(not_named(without, folders)) - set(not_named(layout, folders)) == {"collection/"}
    assert set(not_named(layout.replace("  cli.py", "  "), modules)) - set(not_named(layout, modules)) == {"cli.py"}


# ---- references to docs/design.md ----------------------------------------------------------------
def test_every_design_reference_resolves():
    sections = design_sections()
    assert {"1", "2", "2.3", "14", "14.2"} <= sections, sorted(sections)
    cited, unresolved = 0, []
    for path in text_files():
        text = path.read_text(errors="replace")
        refs = SECTION.findall(text) if path == DESIGN_PAGE else cited_sections(text)  # the page's own "§N" too
        cited += len(refs)
        unresolved += [f"{path.relative_to(ROOT)}: §{s}" for s in refs if s not in sections]
    assert unresolved == []
    assert cited > 50, "found almost no references to docs/design.md: is the pattern still right?"


PAGE = "docs/design" + ".md"  # spelt apart: the examples below are not references of this file


@pytest.mark.parametrize(
    ("text", "refs"),
    [
        (f"({PAGE} §3.1, §7, §8).", ["3.1", "7", "8"]),
        (f"[{PAGE} §2.3](design.md) format", ["2.3"]),
        (f"Adam ({PAGE} §6.3: 1e-3, 1e-4)", ["6.3"]),
        (f"the import order of {PAGE} §14.2 asks", ["14.2"]),
        (f"see {PAGE} for the layout", []),
    ],
)
def test_references_are_read_as_written(text, refs):
    assert cited_sections(text) == refs


def test_an_unknown_section_is_reported():
    assert "99" not in design_sections() and cited_sections(f"{PAGE} §99") == ["99"]


def test_no_file_cites_the_old_design_notes():
    citing = [
        f"{path.relative_to(ROOT)}:{n}"
        for path in text_files()
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1)
        if OLD_NOTES.search(line)
    ]
    assert citing == []
    assert OLD_NOTES.search("see " + "DES" + "IGN.md §7") and OLD_NOTES.search("(" + "DES" + "IGN §2 names it)")
