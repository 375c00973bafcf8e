"""The README runs as written: every ``console`` session and every ``python``
block of README.md, in order, in a fresh directory, printing what the README shows.

A ``console`` block is a session: each ``$ `` line is a command (run by one bash for the
whole README, so ``export`` and ``cd`` carry on), the lines after it are what it must
print, stdout and stderr together. A ``python`` block runs as a script of its own in
that shell (its working directory and variables); a ``print(...)  # text`` line says
it prints ``text``, and the block must print exactly those lines. Blocks written as
``sh`` or ``text`` are synopses, not sessions: they are not run.

The README works in ``/tmp/tenantry-quickstart``; the test runs it in a fresh
directory whose path has the same length (tables drawn around a path keep their
width) and reads that path for the README's.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
HOME = "/tmp/tenantry-quickstart"
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```[ \t]*$", re.DOTALL | re.MULTILINE)
EXPECTED = re.compile(r"^\s*print\(.*\)\s+#\s?(.*)$")
MARK = "@@tenantry-readme-step-{}@@"


@dataclass
class Step:
    line: int  # where it is in README.md
    kind: str  # console | python
    source: str  # a command line, or a Python script
    expected: list[str]


def steps(text: str) -> list[Step]:
    found: list[Step] = []
    for block in FENCE.finditer(text):
        kind, body = block.group(1), block.group(2)
        line = text.count("\n", 0, block.start()) + 1
        if kind == "python":
            expected = [m.group(1) for m in map(EXPECTED.match, body.splitlines()) if m]
            found.append(Step(line, "python", body, expected))
        elif kind == "console":
            for offset, row in enumerate(body.splitlines(), start=1):
                if row.startswith("$ "):
                    found.append(Step(line + offset, "console", row[2:], []))
                elif found and found[-1].kind == "console":
                    found[-1].expected.append(row)
                else:
                    raise AssertionError(f"README.md:{line + offset}: output before any command")
    return found


def fresh_directory() -> Path:
    """A new directory whose path is as long as the README's."""
    base = Path("/tmp") / f"tq-{secrets.token_hex(4)}"
    path = Path(str(base) + "x" * (len(HOME) - len(str(base))))
    assert len(str(path)) == len(HOME)
    return path


def test_the_readme_runs_as_written(tmp_path: Path) -> None:
    text = README.read_text()
    todo = steps(text)
    assert sum(s.kind == "console" for s in todo) >= 10
    assert sum(s.kind == "python" for s in todo) >= 3
    home = fresh_directory()
    script = ["exec 2>&1"]
    for number, step in enumerate(todo):
        script.append(f"echo {MARK.format(number)}")
        source = step.source.replace(HOME, str(home))
        if step.kind == "console":
            script.append(source)
        else:
            program = tmp_path / f"block-{step.line}.py"
            program.write_text(source)
            script.append(f"python {program}")
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("TENANTRY_", "PYTHON", "VIRTUAL_ENV", "COLUMNS", "LINES"))
    }
    env.update(
        PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '/usr/bin:/bin')}",
        COLUMNS="80",
        TERM="dumb",
        NO_COLOR="1",
    )
    try:
        done = subprocess.run(
            ["bash", "-c", "\n".join(script)],
            check=False,
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        output = done.stdout.replace(str(home), HOME)
    finally:
        shutil.rmtree(home, ignore_errors=True)
    pieces = re.split(r"^@@tenantry-readme-step-(\d+)@@\n", output, flags=re.MULTILINE)
    printed = {int(pieces[i]): pieces[i + 1] for i in range(1, len(pieces) - 1, 2)}
    assert pieces[0] == "", pieces[0]
    for number, step in enumerate(todo):
        got = printed.get(number, "").rstrip("\n")
        got_lines = [row.rstrip() for row in got.splitlines()] if got else []
        want = [row.rstrip() for row in step.expected]
        if got_lines != want:
            pytest.fail(
                f"README.md:{step.line}: {step.source.splitlines()[0]!r} printed\n"
                + "\n".join(got_lines)
                + "\ninstead of\n"
                + "\n".join(want),
                pytrace=False,
            )


@pytest.mark.parametrize("name", ["README.md", "docs/DESIGN.md", "benchmarks/README.md"])
def test_every_link_within_the_page_names_a_heading(name: str) -> None:
    """``[text](#anchor)`` links go to a heading of the same page (GitHub's anchors:
    lower case, punctuation dropped, spaces as hyphens); a renamed heading broke two."""
    text = (README.parent / name).read_text()
    without_code = FENCE.sub("", text)
    anchors = {
        re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        for heading in re.findall(r"^#+ (.+)$", without_code, re.MULTILINE)
    }
    links = re.findall(r"\]\(#([^)]+)\)", without_code)
    assert links or name != "README.md", "README.md links within itself"
    assert [link for link in links if link not in anchors] == []
