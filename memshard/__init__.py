"""memshard: memorization-safe diffusion training (IET-AGC+) and sampling (PRSS) on Ray."""

__version__ = "0.1.0"
