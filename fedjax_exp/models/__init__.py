"""The model zoo (``fedjax.models``)."""

from fedjax_exp.models import emnist

__all__ = ["emnist"]
