"""The pipeline's public functions: capture, prepare / calibrate / convert, mode switches,
export and load of runtime files, lowering to integer reference ops. ``qgraph.*`` re-exports them."""
