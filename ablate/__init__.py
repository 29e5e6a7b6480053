"""ablate: loss ablations of one-stage object detectors."""

__version__ = "0.1.0"
