"""Dataset loaders (``fedjax.datasets``)."""

from fedjax_exp.datasets import emnist

__all__ = ["emnist"]
