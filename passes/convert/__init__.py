"""Passes of the convert pipeline (fake-quant → quantize / dequantize ops, integer weights)."""
