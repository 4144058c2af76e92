"""Passes that add LoRA adapters to a prepared graph and merge them into its weights."""
