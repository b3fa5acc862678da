"""rdro: align language models with binary feedback using Relative Density Ratio Optimization."""

__version__ = "0.1.0"
