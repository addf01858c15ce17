"""Aggregators: how a round's client updates become one (``fedjax.aggregators``).

``mean_aggregator`` is the weighted mean FedAvg uses; the compression aggregators average
stochastically quantized updates and count the bits a client sends. The names FedJAX 0.0.17
exports here are all present, plus its other compressing aggregators; the submodules
``aggregator``, ``compression`` and ``walsh_hadamard`` hold the rest.
"""

from fedjax_exp.aggregators import aggregator, compression, walsh_hadamard
from fedjax_exp.aggregators.aggregator import Aggregator, mean_aggregator
from fedjax_exp.aggregators.compression import (
    binary_stochastic_quantize,
    rotated_uniform_stochastic_quantizer,
    structured_drive_quantizer,
    terngrad_quantizer,
    uniform_stochastic_quantize,
    uniform_stochastic_quantize_pytree,
    uniform_stochastic_quantizer,
)
from fedjax_exp.aggregators.walsh_hadamard import walsh_hadamard_transform

__all__ = [
    "Aggregator",
    "aggregator",
    "binary_stochastic_quantize",
    "compression",
    "mean_aggregator",
    "rotated_uniform_stochastic_quantizer",
    "structured_drive_quantizer",
    "terngrad_quantizer",
    "uniform_stochastic_quantize",
    "uniform_stochastic_quantize_pytree",
    "uniform_stochastic_quantizer",
    "walsh_hadamard",
    "walsh_hadamard_transform",
]
