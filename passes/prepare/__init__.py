"""Passes of the prepare pipeline (capture → observers / fake-quant)."""
