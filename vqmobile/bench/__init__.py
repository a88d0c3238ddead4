"""Benchmarks: kernel speed (kernels.py) and quantization quality (quality.py)."""
