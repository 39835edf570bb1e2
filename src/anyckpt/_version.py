"""The package version, one constant: read by ``anyckpt.__init__`` and ``anyckpt.meta``."""

__version__ = "0.1.0"
