"""Names and format versions of the dump files, for their writer and their readers.

:mod:`qgraph.core.dump` writes the files; viewers such as :mod:`qgraph.tools.report` read
them. Both take the names from here, and this module imports nothing, so a viewer can read
dumps without importing torch.
"""

from __future__ import annotations

PASS_SCHEMA = "qgraph.dump/2"
"""``"schema"`` of every ``NNN_<pass>.json``; a viewer ignores graph data of another version."""
INDEX_SCHEMA = "qgraph.dump.index/2"
"""``"schema"`` of ``index.json``."""
INDEX_JSON = "index.json"
INDEX_TEXT = "index.txt"


def pass_stem(index: int, name: str) -> str:
    """``003_annotate``: the file name, without suffix, of pass ``index`` of a stage."""
    return f"{index:03d}_{name}"
