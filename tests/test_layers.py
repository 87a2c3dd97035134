"""The layering contract: handlers talk to the service (service.app.Eddy) only, never to storage.

A plain AST walk rather than import-linter: the contract is one rule ("no module under handlers/ imports
storage or reaches an ``.storage`` attribute"), it needs no extra dependency or configuration file, and its
failure names the file and line. Both forms of access are checked: an import of ``storage`` (or a submodule),
and ``something.storage`` (e.g. ``self.eddy.storage.history(...)``), which would bypass the service's checks.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

HANDLERS = Path(__file__).resolve().parent.parent / "handlers"

def storage_accesses(source: str) -> list[str]:
    """Each place ``source`` imports storage or reaches an ``.storage`` attribute, as ``line: what``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [f"{node.lineno}: import {a.name}" for a in node.names if a.name.split(".")[0] == "storage"]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "storage":
            found.append(f"{node.lineno}: from {node.module} import ...")
        elif isinstance(node, ast.Attribute) and node.attr == "storage":
            found.append(f"{node.lineno}: .storage")
    return found


@pytest.mark.parametrize("path", [pytest.param(path, id=path.name) for path in sorted(HANDLERS.glob("*.py"))])
def test_handlers_never_touch_storage(path: Path):
    assert storage_accesses(path.read_text()) == [], f"{path.name} reaches storage; go through service.app.Eddy"


def test_the_check_sees_every_form_of_access():
    source = "import storage\nimport storage.sqlite as s\nfrom storage import Event\nfrom storage.base import X\n" \
             "async def f(self):\n    await self.eddy.storage.history('t', 'c')\nfrom service import stream\n"
    assert [line.split(":")[0] for line in storage_accesses(source)] == ["1", "2", "3", "4", "6"]
