"""Federated learning algorithms (``fedjax.algorithms``).

FedJAX 0.0.17's algorithms with its signatures, state types and diagnostics (``fed_avg``,
``fed_prox``, ``mime``, ``mime_lite``, ``hyp_cluster``, ``agnostic_fed_avg``, ``apfl``), and two
beyond it: ``scaffold`` (SCAFFOLD with option II control variates) and ``dp_fed_avg``
(DP-FedAvg with clipping, Gaussian noise and privacy accounting).
"""

from fedjax_exp.algorithms import (
    agnostic_fed_avg,
    apfl,
    dp_fed_avg,
    fed_avg,
    fed_prox,
    hyp_cluster,
    mime,
    mime_lite,
    scaffold,
)

__all__ = [
    "agnostic_fed_avg",
    "apfl",
    "dp_fed_avg",
    "fed_avg",
    "fed_prox",
    "hyp_cluster",
    "mime",
    "mime_lite",
    "scaffold",
]
