"""Quantization as data and math: specs, qparams, schemes and rule types, ``QConfig``, batch-norm folding."""
