"""Tests of the documentation: a README read in one pass, links that lead somewhere, a true map.

- README.md stays short (at most `README_MAX_LINES` lines) and opens with the two commands;
- every relative link in README.md, docs/*.md and mock_recommenders/README.md points to a file
  or folder that exists, and a ``#anchor`` to a heading of that file (GitHub's slugs);
- the module map of docs/architecture.md lists every module of `gateway/`, and nothing else:
  a module added, renamed or removed fails here until the map says so.

Plain file reads: no network, no gateway.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.helpers import ROOT

README = ROOT / "README.md"
README_MAX_LINES = 250
ARCHITECTURE = ROOT / "docs" / "architecture.md"
MODULE_MAP_HEADING = "## The gateway's modules"

CHECKED = sorted(
    [
        README,
        ROOT / "mock_recommenders" / "README.md",
        ROOT / "model_servers" / "README.md",
        *(ROOT / "docs").glob("*.md"),
    ]
)

_FENCE = re.compile(r"^(```|~~~)")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
# An inline link or image: [text](target) or ![alt](target "title").
_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_CODE_SPAN = re.compile(r"`+[^`]*`+")


def prose_lines(text: str) -> list[str]:
    """The lines of a markdown document outside fenced code blocks."""
    lines: list[str] = []
    fenced = False
    for line in text.splitlines():
        if _FENCE.match(line.lstrip()):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(line)
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, punctuation but `-` and `_` gone, spaces to `-`."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text stays
    text = text.lower().strip()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a markdown file, repeated headings numbered as GitHub does."""
    seen: dict[str, int] = {}
    found: set[str] = set()
    for line in prose_lines(path.read_text(encoding="utf-8")):
        match = _HEADING.match(line)
        if match is None:
            continue
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def relative_links(path: Path) -> list[str]:
    """The link targets of a markdown file that are not URLs (code spans and blocks left out)."""
    targets: list[str] = []
    for line in prose_lines(path.read_text(encoding="utf-8")):
        # A code span may hold text that looks like a link; a link's own text may be code.
        for match in _LINK.finditer(_CODE_SPAN.sub("code", line)):
            target = match.group(1)
            if not re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):
                targets.append(target)
    return targets


def broken_links(path: Path) -> list[str]:
    """What is wrong with each relative link of `path`, one line each."""
    problems: list[str] = []
    for target in relative_links(path):
        file_part, _, anchor = target.partition("#")
        destination = (path.parent / file_part).resolve() if file_part else path
        if not destination.exists():
            problems.append(f"{target}: no such file or folder {destination}")
            continue
        if not anchor or destination.suffix != ".md":
            continue
        if destination.is_dir() or anchor not in anchors(destination):
            where = file_part or path.name
            problems.append(f"{target}: no heading with the anchor #{anchor} in {where}")
    return problems


def gateway_modules() -> set[str]:
    """Every module of the gateway package and its subpackages, as `gateway/.../name.py`."""
    return {path.relative_to(ROOT).as_posix() for path in (ROOT / "gateway").rglob("*.py")}


def mapped_modules() -> list[str]:
    """The modules the module map of docs/architecture.md lists, in its first column."""
    lines = prose_lines(ARCHITECTURE.read_text(encoding="utf-8"))
    assert MODULE_MAP_HEADING in lines, f"{ARCHITECTURE} has no section {MODULE_MAP_HEADING!r}"
    listed: list[str] = []
    for line in lines[lines.index(MODULE_MAP_HEADING) + 1 :]:
        if line.startswith("#"):
            break
        if not line.startswith("|"):
            continue
        first_cell = line.strip("|").split("|", 1)[0]
        listed += re.findall(r"`(gateway/[\w./]+\.py)`", first_cell)
    return listed


def test_the_readme_is_short_and_opens_with_the_two_commands() -> None:
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f"README.md has {len(lines)} lines, more than {README_MAX_LINES}: move detail to docs/"
    )
    fenced = False
    sections: list[int] = []
    for number, line in enumerate(lines):
        fenced ^= bool(_FENCE.match(line.lstrip()))
        if not fenced and line.startswith("## "):
            sections.append(number)
    assert sections, "README.md has no sections"
    end = sections[1] if len(sections) > 1 else len(lines)
    first = lines[sections[0] : end]
    commands = [line.split("#", 1)[0].strip() for line in first]
    assert "make run" in commands and "make test" in commands, (
        f"README.md's first section ({lines[sections[0]]!r}) must show `make run` and `make test`"
    )
    # Nothing but the title and a few paragraphs before them.
    assert all(not line.startswith("```") for line in lines[: sections[0]])


@pytest.mark.parametrize("path", CHECKED, ids=lambda path: str(path.relative_to(ROOT)))
def test_every_relative_link_leads_somewhere(path: Path) -> None:
    problems = broken_links(path)
    assert not problems, f"broken links in {path.relative_to(ROOT)}:\n" + "\n".join(problems)


def test_the_module_map_lists_every_gateway_module_and_no_other() -> None:
    listed = mapped_modules()
    repeated = sorted({module for module in listed if listed.count(module) > 1})
    missing = sorted(gateway_modules() - set(listed))
    extra = sorted(set(listed) - gateway_modules())
    assert not (missing or extra or repeated), (
        f"the module map in docs/architecture.md ({MODULE_MAP_HEADING!r}) is out of date: "
        f"missing {missing or 'none'} (add a row each: `gateway/name.py` | what it holds); "
        f"listed but not in gateway/: {extra or 'none'}; listed twice: {repeated or 'none'}"
    )


def test_the_link_check_finds_what_is_broken(tmp_path: Path) -> None:
    (tmp_path / "other.md").write_text("# Other\n\n## Slow clients: the HTTP edge\n\n## Other\n")
    document = tmp_path / "doc.md"
    document.write_text(
        "# Doc\n\n"
        "[fine](other.md#slow-clients-the-http-edge) [twice](other.md#other-1) [up](#doc)\n"
        "[gone](missing.md) [no anchor](other.md#nowhere) [here](#not-here)\n"
        "`[code](code.md)` [`code as text`](other.md) [web](https://example.com/x.md)\n"
        "```\n[in a block](block.md)\n# Not a heading\n```\n"
    )
    problems = broken_links(document)
    assert [problem.split(":", 1)[0] for problem in problems] == [
        "missing.md",
        "other.md#nowhere",
        "#not-here",
    ]
    assert anchors(document) == {"doc"}
    assert slug("The `gateway` modules_x, v2.0!") == "the-gateway-modules_x-v20"
