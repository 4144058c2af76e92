"""Rewrite passes, one per file, grouped by pipeline stage (``qgraph.passes``)."""
