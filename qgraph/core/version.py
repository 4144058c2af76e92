"""qgraph's version: one home, read by the package metadata (pyproject.toml) and the files qgraph writes."""

__version__ = "0.1.0"
