"""Passes that lower Q/DQ patterns to the integer reference ops (``qgraph.lower``)."""
