"""Tools on top of the pipeline: check, compare, sensitivity / mixed precision, coverage, report.
Nothing imports a tool."""
