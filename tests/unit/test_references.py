"""The repository explains itself: every reference in a tracked text file points at something a clone holds.

Fails, naming file:line, on
- a path to a repository file that does not exist (`docs/foo.md`, `pipeline/x/y.py`, `docs/x.md#anchor`);
- a citation of a document the repository does not hold (the project's working notes outside it);
- an issue number of this project's tracker ("issue 12", "(#13)"). An upstream issue is cited by its URL.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SUFFIXES = {".py", ".md", ".toml", ".js", ".html"}
EXCLUDED_DIRS: tuple[str, ...] = ()
SELF = Path(__file__).relative_to(ROOT).as_posix()  # this file spells out the patterns it looks for

TOP_DIRS = "pipeline|server|client|tests|bench|tools|docs|static|templates"
# A path under a top-level folder, ending in a file extension; not part of a longer path (`/x/docs/a.md`)
# and not a pattern (`*`, `{`, `<`).
PATH = re.compile(
    rf"(?<![\w./*{{<-])((?:{TOP_DIRS})/[\w./-]*?\.(?:py|md|toml|js|html|css|json|yaml|txt|log|sh))(?![\w/*{{])"
)
TOP_FILES = re.compile(r"(?<![\w./-])((?:README|CHANGELOG|LICENSE)\.md|config\.toml|pyproject\.toml)\b")
# A relative Markdown link inside docs/ (`[x](lm.md#prompt)`).
MD_LINK = re.compile(r"\]\((?!https?:|#|/)([^)\s#]+)(?:#[^)\s]*)?\)")

OUTSIDE_DOCS = re.compile(
    r"\b(?:DESIGN|REFERENCE|BASELINE|STYLE)\.md\b"  # notes kept outside the repository
    r"|\bREFERENCE\s*§|§\s*\d"  # a section of an outside document
    r"|\bBASELINE\b(?!_)"
    r"|(?<![\w-])shared/"
)
BRIEF = re.compile(r"\bthe brief\b", re.IGNORECASE)
ISSUE = re.compile(
    r"\bissues?\s+#?\d+"  # "issue 12", "Issue 14 item 2", "issues 12"
    r"|(?<![\w&/])#\d{1,4}\b(?![\w;])"  # "(#13)", "PR #86"; not a colour (`#333`) nor an entity (`&#8203;`)
    r"|\bPR\s+\d+\b",
    re.IGNORECASE,
)


def _tracked_text_files() -> list[str]:
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    files = [f for f in out.splitlines() if Path(f).suffix in SUFFIXES or Path(f).name == "Makefile"]
    return [f for f in files if f != SELF and not f.startswith(EXCLUDED_DIRS)]


def _issue_hits(path: str, line: str) -> list[str]:
    """Issue numbers on a line; in HTML, JS and CSS a `#123` is a colour or a selector, so only words
    count."""
    hits = [m.group(0) for m in ISSUE.finditer(line)]
    if Path(path).suffix in {".html", ".js"}:
        hits = [h for h in hits if not h.startswith("#")]
    return hits


def _problems(path: str, root: Path = ROOT) -> list[str]:
    problems = []
    text = (root / path).read_text(encoding="utf-8", errors="replace")
    for number, line in enumerate(text.splitlines(), start=1):
        where = f"{path}:{number}"
        for target in [m.group(1) for m in PATH.finditer(line)] + [
            m.group(1) for m in TOP_FILES.finditer(line)
        ]:
            if not (root / target).exists():
                problems.append(f"{where}: {target} does not exist")
        if path.endswith(".md"):
            for target in MD_LINK.findall(line):
                if not (root / path).parent.joinpath(target).exists():
                    problems.append(f"{where}: link {target} does not exist")
        for m in [*OUTSIDE_DOCS.finditer(line), *BRIEF.finditer(line)]:
            problems.append(f"{where}: cites {m.group(0)!r}, which the repository does not hold")
        for hit in _issue_hits(path, line):
            problems.append(f"{where}: issue number {hit!r} (state the fact, or cite docs/...)")
    return problems


def test_references_point_inside_the_repository() -> None:
    problems = [p for f in _tracked_text_files() for p in _problems(f)]
    assert not problems, f"{len(problems)} references a clone cannot follow:\n" + "\n".join(problems)


@pytest.mark.parametrize(
    "line, bad",
    [
        ("see docs/nothing_here.md", True),
        ("see docs/lm.md#prompt", False),
        ("pipeline/lm/prompt.py and pipeline/lm/nope.py", True),
        ("the facts are in REFERENCE.md §4", True),
        ("as REFERENCE §5.5 says", True),
        ("rows head-major (§3.2)", True),
        ("measured in BASELINE.md", True),
        ("read ../shared/notes", True),
        ("as the brief asks", True),
        ("fixed in issue 12", True),
        ("Issue 14 item 2: resume", True),
        ("the fix (#86)", True),
        ("PR #86 is unmerged", True),
        ("an issue with the decoder, HTTP 404, a 429 reply", False),
        ("x = 3  # 13 text tokens", False),
        ("upstream https://github.com/zai-org/GLM-4-Voice/issues/113", False),
        ("OFFICIAL_BASELINE_S = 1.0; a shared memory segment", False),
    ],
)
def test_the_scan_flags_what_it_should(tmp_path: Path, line: str, bad: bool) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "lm.md").write_text("# lm\n")
    (tmp_path / "pipeline" / "lm").mkdir(parents=True)
    (tmp_path / "pipeline" / "lm" / "prompt.py").write_text("")
    (tmp_path / "note.md").write_text(line + "\n")
    assert bool(_problems("note.md", root=tmp_path)) is bad
