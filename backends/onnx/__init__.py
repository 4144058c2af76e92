"""The ONNX emitter (QDQ model for ONNX Runtime) and its export-time rewrites."""
