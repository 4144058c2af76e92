"""Observers and fake-quant modules: min-max, moving average, histogram, learnable (LSQ),
and the factory that builds one for a spec."""
