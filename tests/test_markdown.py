"""tools/check_markdown.py: the repository's Markdown renders its tables and resolves its links,
and the check fails, naming file:line, on a file that does not."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tools" / "check_markdown.py"
_spec = importlib.util.spec_from_file_location("check_markdown", SCRIPT)
check_markdown = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check_markdown)

BAD = """# Title

| a | b |
| 1 | 2 |

See [the guide](docs/missing.md) and [a section](#no-such-section).

| a | b | c |
|---|---|
| 1 | 2 | 3 |

A link whose [text spans
two lines](gone.md) is read too.
"""

GOOD = """# Title

## The quality benchmark (`make quality`)

| a | b |
|:---|---:|
| 1 | 2 |

- |x - y| is a distance, not a table row
  |x| neither

```text
| not | a table |
[not a link](nowhere.md)
```

`[not a link](nowhere.md)` and [the site](https://example.org/x.md), [home](other.md),
[a section](#the-quality-benchmark-make-quality), [there](other.md#part-two),
[a folder](sub), ![an image](sub/pic.png), [a link across
lines](other.md#part-two).

[ref]: other.md
"""

OTHER = """# Other

## Part two
"""


def _tree(tmp_path: Path, readme: str) -> Path:
    (tmp_path / "README.md").write_text(readme, encoding="utf-8")
    (tmp_path / "other.md").write_text(OTHER, encoding="utf-8")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "pic.png").write_bytes(b"")
    return tmp_path


def test_repository_markdown_is_clean():
    assert check_markdown.check(REPO) == []


def test_a_clean_tree_passes(tmp_path):
    assert check_markdown.check(_tree(tmp_path, GOOD)) == []


def test_a_bad_file_fails_naming_file_and_line(tmp_path):
    root = _tree(tmp_path, BAD)
    run = subprocess.run(
        [sys.executable, str(SCRIPT), str(root)], capture_output=True, text=True, check=False
    )
    assert run.returncode == 1
    lines = run.stdout.splitlines()
    assert lines == [
        "README.md:3: table without a |---| delimiter row after its header",
        "README.md:6: link to a missing file: docs/missing.md",
        "README.md:6: link to a missing anchor: #no-such-section",
        "README.md:8: table header has 3 cells, its delimiter row 2",
        "README.md:13: link to a missing file: gone.md",
    ]


def test_outputs_and_git_are_not_read(tmp_path):
    root = _tree(tmp_path, GOOD)
    for d in ("outputs/runs", ".git"):
        (root / d).mkdir(parents=True)
        (root / d / "bad.md").write_text(BAD, encoding="utf-8")
    assert check_markdown.check(root) == []
    (root / "docs").mkdir()
    (root / "docs" / "bad.md").write_text(BAD, encoding="utf-8")
    assert check_markdown.check(root)[0].startswith("docs/bad.md:3: ")


def test_github_slugs():
    assert check_markdown.slug("The quality benchmark (`make quality`)") == (
        "the-quality-benchmark-make-quality"
    )
    assert check_markdown.slug("Retina windows: x_scale, *flattening*") == (
        "retina-windows-x_scale-flattening"
    )
    assert check_markdown.slug("GAN_R (`+method=ganr`)") == "gan_r-methodganr"
