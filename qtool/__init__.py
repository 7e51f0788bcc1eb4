"""qtool: a model conversion toolchain for large language models."""

__version__ = "0.1.0"
