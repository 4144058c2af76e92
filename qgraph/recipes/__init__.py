"""Recipes composed from the pipeline: presets, dynamic quantization, low-bit LLM schemes, LoRA,
Hugging Face interop, and the training loops of the demo."""
