"""The documentation site covers every module (the build itself, `mkdocs build --strict`, runs
in `make test`)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "eigensam"


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
