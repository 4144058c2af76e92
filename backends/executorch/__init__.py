"""The ExecuTorch emitter (.pte, XNNPACK delegate) and its export-time rewrites."""
