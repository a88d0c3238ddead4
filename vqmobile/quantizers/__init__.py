"""Quantization methods: each one's config (a dataclass, quantizers/base.py) and the algorithm that turns a float
weight, and for Hessian-aware methods its layer's Hessian, into a stored format (vqmobile/formats/)."""
