"""Passes that shape a converted graph for a runtime file (.pte, .onnx)."""
