"""Check the repository's Markdown: every table renders, every relative link resolves.

    python tools/check_markdown.py [ROOT] [--exclude NAME ...]

Reads every ``*.md`` under ROOT (default: the repository this script lives in), skipping
``.git``, ``outputs`` and other build or cache folders, and reports, one ``file:line: message``
per problem:

- a table (a line starting and ending with ``|`` after a line that is not one) whose next
  line is not a delimiter row (``|---|---|``), or whose delimiter row has another number of
  cells than its header: GitHub then shows the lines as text, not as a table;
- a relative link or image (``[text](path)``, ``[id]: path``, ``<a href>``, ``<img src>``) to a
  file or folder that does not exist, resolved against the Markdown file's folder (``/path``
  against ROOT), and an ``#anchor`` (in the same file or in a linked ``.md``) that no heading
  of that file gives, by GitHub's rule (lower case, punctuation dropped, spaces to ``-``,
  ``-1``, ``-2``, ... for repeats).

Fenced code blocks and inline code are not read. Exit status 1 when anything is found, else 0.
"""

from __future__ import annotations

import argparse
import re
import sys
import unicodedata
from pathlib import Path
from urllib.parse import unquote

EXCLUDE = (
    ".git",
    "outputs",
    "multirun",
    ".venv",
    "venv",
    "node_modules",
    "build",
    "dist",
    ".pytest_cache",
    ".ruff_cache",
)
FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
DELIMITER_CELL = re.compile(r"^\s*:?-+:?\s*$")
CODE_SPAN = re.compile(r"(`+)(.+?)\1", re.S)
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*(<[^>]*>|[^)\s]*)(?:\s+[^)]*)?\)")
REF_DEF = re.compile(r"^ {0,3}\[[^\]]+\]:\s*(<[^>]*>|\S+)")
HTML_LINK = re.compile(r"<(?:a|img)\b[^>]*?\b(?:href|src)\s*=\s*[\"']([^\"']*)[\"']", re.I)
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
HTML_ANCHOR = re.compile(r"<a\b[^>]*?\b(?:name|id)\s*=\s*[\"']([^\"']+)[\"']", re.I)
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def markdown_files(root: Path, exclude: tuple[str, ...] = EXCLUDE) -> list[Path]:
    """Every ``*.md`` under ``root``, sorted, none inside a folder named in ``exclude`` or
    ending in ``.egg-info``."""
    out = []
    for p in sorted(root.rglob("*.md")):
        parts = p.relative_to(root).parts[:-1]
        if any(d in exclude or d.endswith(".egg-info") for d in parts):
            continue
        if p.is_file():
            out.append(p)
    return out


def prose_lines(text: str, blank_code: bool = True) -> list[tuple[int, str]]:
    """(line number, line) of the lines outside fenced code blocks, inline code blanked (or
    kept: ``blank_code=False``)."""
    out = []
    fence = None
    for n, line in enumerate(text.splitlines(), 1):
        m = FENCE.match(line)
        if fence is None and m:
            fence = m.group(1)
            continue
        if fence is not None:
            if m and m.group(1)[0] == fence[0] and len(m.group(1)) >= len(fence):
                fence = None
            continue
        if blank_code:
            line = CODE_SPAN.sub(lambda c: " " * len(c.group(0)), line)
        out.append((n, line))
    return out


def cells(row: str) -> list[str]:
    """The cells of a table row (split on unescaped ``|``, outer pipes dropped)."""
    row = row.strip()
    if row.startswith("|"):
        row = row[1:]
    if row.endswith("|") and not row.endswith("\\|"):
        row = row[:-1]
    return re.split(r"(?<!\\)\|", row)


def is_table_row(line: str) -> bool:
    """A line that starts and ends with ``|`` (a text line that only starts with one, e.g. an
    absolute value ``|x - y| ...`` continuing a paragraph, is not taken for a table)."""
    s = line.strip()
    return len(s) > 1 and s.startswith("|") and s.endswith("|")


def is_delimiter(line: str) -> bool:
    return is_table_row(line) and all(DELIMITER_CELL.match(c) for c in cells(line))


def check_tables(lines: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """(line, message) for every table whose header is not followed by a matching delimiter."""
    problems = []
    prev_n, prev_table = -1, False
    for i, (n, line) in enumerate(lines):
        table = is_table_row(line)
        if table and not (prev_table and prev_n == n - 1):
            nxt = lines[i + 1] if i + 1 < len(lines) else None
            if nxt is None or nxt[0] != n + 1 or not is_delimiter(nxt[1]):
                problems.append((n, "table without a |---| delimiter row after its header"))
            elif len(cells(nxt[1])) != len(cells(line)):
                problems.append(
                    (
                        n,
                        f"table header has {len(cells(line))} cells, its delimiter row "
                        f"{len(cells(nxt[1]))}",
                    )
                )
        prev_n, prev_table = n, table
    return problems


def slug(heading: str) -> str:
    """GitHub's anchor of a heading's text (before de-duplication)."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links: their text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "")
    out = []
    for ch in text.strip().lower():
        if ch in " -_" or unicodedata.category(ch)[0] in "LN":
            out.append("-" if ch == " " else ch)
    return "".join(out)


def anchors(path: Path) -> set[str]:
    """The anchors a Markdown file gives: its headings' slugs and explicit HTML anchors."""
    seen: dict[str, int] = {}
    out = set()
    for _, line in prose_lines(path.read_text(encoding="utf-8"), blank_code=False):
        out.update(HTML_ANCHOR.findall(line))
        m = HEADING.match(line)
        if not m:
            continue
        s = slug(m.group(2))
        k = seen.get(s, 0)
        seen[s] = k + 1
        out.add(s if k == 0 else f"{s}-{k}")
    return out


def link_targets(lines: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """(line, target) of every link and image of the lines; a link's text may span lines (the
    line reported is its target's)."""
    by_number = dict(lines)
    text = "\n".join(by_number.get(n, "") for n in range(1, max(by_number, default=0) + 1))
    out = []
    for pattern in (INLINE_LINK, HTML_LINK):
        for m in pattern.finditer(text):
            out.append((text.count("\n", 0, m.start(1)) + 1, m.group(1).strip("<>")))
    for n, line in lines:
        m = REF_DEF.match(line)
        if m:
            out.append((n, m.group(1).strip("<>")))
    return sorted(out, key=lambda t: t[0])


def check_links(
    path: Path, root: Path, lines: list[tuple[int, str]], cache: dict[Path, set[str]]
) -> list[tuple[int, str]]:
    """(line, message) for every relative link of ``path`` to a missing file or anchor."""
    problems = []
    for n, target in link_targets(lines):
        if not target or SCHEME.match(target) or target.startswith("//"):
            continue
        file_part, _, fragment = target.partition("#")
        file_part = unquote(file_part.split("?", 1)[0])
        if file_part:
            base = root if file_part.startswith("/") else path.parent
            dest = (base / file_part.lstrip("/")).resolve()
            if not dest.exists():
                problems.append((n, f"link to a missing file: {target}"))
                continue
        else:
            dest = path
        if fragment and dest.is_file() and dest.suffix == ".md":
            if dest not in cache:
                cache[dest] = anchors(dest)
            if unquote(fragment).lower() not in cache[dest]:
                problems.append((n, f"link to a missing anchor: {target}"))
    return problems


def check(root: Path, exclude: tuple[str, ...] = EXCLUDE) -> list[str]:
    """Every problem of the Markdown files under ``root``, as ``file:line: message``."""
    root = root.resolve()
    cache: dict[Path, set[str]] = {}
    out = []
    for path in markdown_files(root, exclude):
        lines = prose_lines(path.read_text(encoding="utf-8"))
        problems = check_tables(lines) + check_links(path, root, lines, cache)
        rel = path.relative_to(root)
        out += [f"{rel}:{n}: {msg}" for n, msg in sorted(problems, key=lambda p: p[0])]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    default_root = Path(__file__).resolve().parents[1]
    parser.add_argument("root", nargs="?", type=Path, default=default_root)
    parser.add_argument(
        "--exclude", nargs="*", default=[], help="more folder names to skip (beside the defaults)"
    )
    args = parser.parse_args(argv)
    problems = check(args.root, EXCLUDE + tuple(args.exclude))
    for p in problems:
        print(p)
    if problems:
        print(f"{len(problems)} Markdown problem(s)", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
