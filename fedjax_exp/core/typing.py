"""Type aliases shared across fedjax_exp (the same names FedJAX exports)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

PyTree = Any
Params = PyTree
OptState = PyTree
PRNGKey = jax.Array

# A client is identified by the bytes of its id, as in FedJAX (e.g. b'f0424_27').
ClientId = bytes

# Examples are dicts of arrays: one example maps feature -> array; a batch stacks them.
SingleExample = Mapping[str, np.ndarray | jax.Array]
BatchExample = Mapping[str, np.ndarray | jax.Array]
SinglePrediction = PyTree
BatchPrediction = PyTree

# Padded batches mark their real examples with a boolean vector under this key. Defined here,
# below both models and data, so each can honour masks without importing the other.
EXAMPLE_MASK_KEY = "__mask__"
