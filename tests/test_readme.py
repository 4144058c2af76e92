"""The README's Python snippets name only what exists.

Every ```python block of README.md must parse; every ``from qgraph... import name`` in it
must import, and every ``qgraph.<name>`` it uses must be a public name of the package. (The
snippets' behaviour is tested where the feature is; this keeps their spelling true as the
tree moves.)
"""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

import qgraph

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def _source(block: str) -> str:
    """The block with ``...`` placeholder lines (``... train gm ...``) made into comments."""
    return "\n".join("# " + line if line.strip().startswith("...") else line for line in block.splitlines())


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_snippet_names_exist(index):
    tree = ast.parse(_source(BLOCKS[index]))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "qgraph":
            module = importlib.import_module(node.module)
            for alias in node.names:
                assert hasattr(module, alias.name), f"README block {index}: {node.module} has no {alias.name}"
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "qgraph":
            assert hasattr(qgraph, node.attr), f"README block {index}: qgraph.{node.attr} does not exist"


def test_readme_has_snippets():
    assert len(BLOCKS) >= 5
