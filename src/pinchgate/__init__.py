"""pinchgate: one-pass compression of speech foundation models with self-pinching gates."""

__version__ = "0.1.0"
