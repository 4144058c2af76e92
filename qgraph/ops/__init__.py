"""Custom torch ops: quantize / dequantize helpers, stochastic depth, integer kernels for export
and the integer reference kernels of each runtime."""
