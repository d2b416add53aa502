"""Every ```python block in the README and docs/ runs, in order, one namespace per file."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_code_blocks_run(page, capsys):
    blocks = BLOCK.findall(page.read_text())
    namespace: dict = {"__name__": f"docs_{page.stem}"}
    for i, code in enumerate(blocks):
        try:
            exec(compile(code, f"{page.name}[block {i}]", "exec"), namespace)
        except Exception as err:  # pragma: no cover - the failure message is the point
            raise AssertionError(f"{page.name} block {i} failed: {err!r}\n{code}") from err


def test_docs_have_code():
    assert sum(len(BLOCK.findall(p.read_text())) for p in PAGES) >= 8
