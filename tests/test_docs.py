"""The documentation: every module has a reference page, every Python block of the README and of
docs/ runs as written, and what the pages name exists (the build itself, `mkdocs build --strict`,
runs in `make test`).

Code blocks: the ```python blocks of a page run in order in one fresh interpreter, in a temporary
folder. A page may define what its fragments use (``model``, ``closure``) in a hidden setup
comment, shown on the site as nothing::

    <!-- docs-test setup
    model = ...
    -->

A block that cannot run on a CPU in a few seconds (it needs torchrun or a download) is marked on
the line before it with ``<!-- docs-test: skip, REASON -->``.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "eigensam"
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])

SETUP = re.compile(r"^<!-- docs-test setup\n(?P<code>.*?)^-->", re.M | re.S)
FENCE = re.compile(r"^(?P<indent>[ \t]*)```python\n(?P<code>.*?)^(?P=indent)```", re.M | re.S)
SKIP = re.compile(r"<!-- docs-test: skip, (?P<reason>[^>]+?) -->\s*$")


def public_modules() -> list[str]:
    """Every module file of eigensam except packages' __init__ and private modules."""
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if not parts[-1].startswith("_"):
            names.append(".".join(parts))
    return names


def test_every_module_has_a_reference_page():
    documented = set()
    for page in (ROOT / "docs").rglob("*.md"):
        documented |= set(re.findall(r"^::: (\S+)\s*$", page.read_text(), re.M))
    missing = [name for name in public_modules() if name not in documented]
    assert not missing, (
        f"modules without a reference page: {missing}; add a line `::: <module>` to the page of "
        "docs/reference/ it belongs to (and the page to the Reference group of `nav` in mkdocs.yml "
        "if it is new)"
    )
    assert documented <= set(public_modules()) | {"eigensam"}, documented - set(public_modules())


def code_blocks(text: str) -> list[tuple[int, str, str | None]]:
    """``(line, code, skip reason or None)`` of a page's setup comments and Python blocks, in
    page order."""
    blocks = []
    for match in SETUP.finditer(text):
        blocks.append((text.count("\n", 0, match.start()) + 1, match["code"], None))
    for match in FENCE.finditer(text):
        before = text[: match.start()].rstrip().rsplit("\n", 1)[-1]
        skip = SKIP.search(before)
        code = textwrap.dedent(match["code"])
        blocks.append((text.count("\n", 0, match.start()) + 1, code, skip and skip["reason"]))
    return sorted(blocks)


def runnable_pages() -> list[Path]:
    """Pages with a block to run; the README's is run by its own test, below."""
    return [
        page
        for page in PAGES
        if page.name != "README.md" and any(not s for *_, s in code_blocks(page.read_text()))
    ]


def run_page(page: Path, tmp_path: Path, epilogue: str = "") -> subprocess.CompletedProcess:
    """The page's runnable blocks (and ``epilogue``) as one script in a fresh interpreter."""
    parts = []
    for line, code, skip in code_blocks(page.read_text()):
        if not skip:
            parts.append(f"# {page.relative_to(ROOT)}:{line}\n{code}")
    script = "\n".join(parts) + "\n" + epilogue
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_code_blocks_are_found():
    text = (
        "<!-- docs-test setup\nx = 1\n-->\n\n```python\ny = x\n```\n\n"
        "<!-- docs-test: skip, needs torchrun -->\n```python\nz = 1\n```\n\n"
        "- item\n\n  ```python\n  w = 2\n  ```\n\n```bash\nls\n```\n"
    )
    assert code_blocks(text) == [
        (1, "x = 1\n", None),
        (5, "y = x\n", None),
        (10, "z = 1\n", "needs torchrun"),
        (16, "w = 2\n", None),
    ]


@pytest.mark.parametrize("page", runnable_pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_page_code_runs(page, tmp_path):
    done = run_page(page, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]


def test_skipped_blocks_are_few_and_say_why():
    skipped = [
        (page.relative_to(ROOT), line, reason)
        for page in PAGES
        for line, _, reason in code_blocks(page.read_text())
        if reason
    ]
    assert len(skipped) <= 6, skipped
    assert all(len(reason.split()) >= 2 for *_, reason in skipped), skipped


def test_readme_example_trains_and_tracks_the_eigenvalue(tmp_path):
    """The README's example is complete: it runs alone and lowers the loss below chance
    (ln 4 for 4 classes) while Eigen-SAM holds an eigenvalue estimate."""
    check = (
        "\nimport math, json\n"
        "with torch.no_grad():\n"
        "    full = criterion(model(data.tensors[0]), data.tensors[1]).item()\n"
        "print(json.dumps({'full': full, 'eig': opt.tracker.eigenvalue}))\n"
    )
    done = run_page(ROOT / "README.md", tmp_path, epilogue=check)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["full"] < 0.5 * math.log(4), result
    assert result["eig"] is not None and result["eig"] > 0, result


def test_cli_resume_example_names_the_folder_the_config_writes():
    from eigensam.lab.engine.config import load_config

    text = (ROOT / "docs" / "cli.md").read_text()
    config = re.search(r"eigensam train --config (\S+)", text)[1]
    resume = re.search(r"eigensam train --resume (\S+)", text)[1]
    assert Path(resume) == load_config(ROOT / config).run_dir


def test_pages_speak_of_the_product_not_of_its_history():
    """No page but the changelog names the work items or work sessions that produced it."""
    history = re.compile(r"\bissue[- ]?#?\d+|\bsessions?\b", re.I)
    found = [
        f"{page.relative_to(ROOT)}: {match[0]!r}"
        for page in PAGES
        if page.name != "changelog.md"
        for match in history.finditer(page.read_text())
    ]
    assert not found, found


def test_included_sections_exist():
    """Every ``--8<-- "FILE:SECTION"`` include names a section that FILE marks (the snippets
    extension would include nothing for a missing one); paths resolve as mkdocs.yml's
    ``base_path`` does (the repository root, then docs/)."""
    include = re.compile(r'^--8<-- "(?P<file>[^":]+):(?P<section>[A-Za-z][\w-]*)"$', re.M)
    found = [(page, m) for page in PAGES for m in include.finditer(page.read_text())]
    assert any(m["file"].startswith("benchmarks/results/") for _, m in found)
    missing = []
    for page, m in found:
        file = next(p for p in (ROOT / m["file"], ROOT / "docs" / m["file"]) if p.is_file())
        if f"[start:{m['section']}]" not in file.read_text():
            missing.append(f"{page.relative_to(ROOT)}: {m['file']}:{m['section']}")
    assert not missing, missing


def test_figure_tables_are_rendered_from_their_reports():
    """docs/figures/spectrum_blocks.md, which docs/hessian.md includes, is the table that
    ``eigensam spectrum --per-layer`` renders from the report beside it."""
    from eigensam.lab.curvature_reports import blocks_table

    folder = ROOT / "docs" / "figures"
    report = json.loads((folder / "spectrum_blocks.json").read_text())
    assert (folder / "spectrum_blocks.md").read_text() == blocks_table(report)
