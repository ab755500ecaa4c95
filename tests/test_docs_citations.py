"""Every `METHOD.md §N` citation in the code, configs, tests and docs names a section that docs/METHOD.md has.

A section exists when METHOD.md has a heading `## N.`, `### N.M` or `#### N.M.K`, or, in §10, a row of the quirk
table whose first cell is `10.K`. Citations of the former external description (`spec §N`, `(spec N`) must not
come back: the document they point to is not part of the repository.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHOD = ROOT / "docs" / "METHOD.md"
SCANNED = ("neco", "conf", "tests", "docs", "notebooks", "bench", "README.md", "pyproject.toml")
SUFFIXES = {".py", ".yaml", ".md", ".ipynb", ".toml"}

NUM = r"\d+(?:\.\d+)*"
ITEM = rf"§({NUM})(?:-({NUM}))?"
# `METHOD.md §3.3-3.7`, `METHOD.md §4.1, §10.24`, `METHOD.md §6.1/§6.2`; the text may wrap after `METHOD.md`.
CITATION = re.compile(rf"METHOD\.md\s+{ITEM}((?:(?:, |/){ITEM})*)")
FOLLOWING = re.compile(rf"(?:, |/){ITEM}")
# Inside METHOD.md the sections cite each other without the file name.
INTERNAL = re.compile(rf"(?<![\w.]){ITEM}")
HEADING = re.compile(rf"^#{{2,4}} ({NUM})\.?\s", re.M)
QUIRK_ROW = re.compile(r"^\| (10\.\d+) \|", re.M)
STALE = re.compile(r"[Ss]pec\s*§|\(spec \d|(?<![\w.])[Ss]pec \d+(?:\.\d+)*\b")


def method_sections(text: str) -> set[str]:
    return set(HEADING.findall(text)) | set(QUIRK_ROW.findall(text))


def _range_end(start: str, end: str) -> str:
    """`6.5.6-8` ends at 6.5.8, `1.2-1.5` at 1.5: a short end replaces the start's last components."""
    head, tail = start.split("."), end.split(".")
    return ".".join(head[: len(head) - len(tail)] + tail)


def _expand(start: str, end: str | None) -> list[str]:
    return [start] if not end else [start, _range_end(start, end)]


def cited_sections(text: str) -> list[str]:
    cited = []
    for match in CITATION.finditer(text):
        cited += _expand(match.group(1), match.group(2))
        for item in FOLLOWING.finditer(match.group(3)):
            cited += _expand(item.group(1), item.group(2))
    return cited


def internal_sections(text: str) -> list[str]:
    return [s for m in INTERNAL.finditer(text) for s in _expand(m.group(1), m.group(2))]


def scanned_files() -> list[Path]:
    files = []
    for name in SCANNED:
        path = ROOT / name
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SUFFIXES
                            and ".ipynb_checkpoints" not in p.parts)
    return [p for p in files if p != Path(__file__).resolve()]  # this file spells out faulty citations


def missing_citations(files: list[Path], sections: set[str]) -> list[str]:
    missing = []
    for path in files:
        text = path.read_text(encoding="utf-8")
        cited = internal_sections(text) if path == METHOD else cited_sections(text)
        missing += [f"{path.relative_to(ROOT)}: §{s}" for s in cited if s not in sections]
    return missing


def stale_citations(files: list[Path]) -> list[str]:
    found = []
    for path in files:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if STALE.search(line):
                found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    return found


def test_every_cited_section_exists():
    sections = method_sections(METHOD.read_text(encoding="utf-8"))
    files = scanned_files()
    assert sum(len(cited_sections(p.read_text(encoding="utf-8"))) for p in files) > 150  # the scan sees them
    assert missing_citations(files, sections) == []


def test_no_citation_of_the_former_description_remains():
    assert stale_citations(scanned_files()) == []


def test_the_check_catches_a_missing_section_and_a_stale_citation(tmp_path):
    sections = method_sections(METHOD.read_text(encoding="utf-8"))
    assert {"3.4", "6.5.6", "10.13", "10.19"} <= sections and "6.8" not in sections
    source = tmp_path / "module.py"
    source.write_text('"""Sorting (METHOD.md §3.6), masks (METHOD.md §3.8, §6.8) and queue (METHOD.md\n'
                      '§3.4-3.9, §10.6)."""\n# stays (spec 3.4)\n', encoding="utf-8")
    assert cited_sections(source.read_text()) == ["3.6", "3.8", "6.8", "3.4", "3.9", "10.6"]
    global ROOT
    saved, ROOT = ROOT, tmp_path
    try:
        assert missing_citations([source], sections) == ["module.py: §6.8"]
        assert stale_citations([source]) == ["module.py:3: # stays (spec 3.4)"]
    finally:
        ROOT = saved
    assert cited_sections("METHOD.md §6.5.6-8 and METHOD.md §6.1/§6.2") == ["6.5.6", "6.5.8", "6.1", "6.2"]
