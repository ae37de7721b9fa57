"""sslocal: self-supervised sound-source localization (marginNCE) in JAX/Flax."""

__version__ = "0.1.0"
