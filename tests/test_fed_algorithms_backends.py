"""The algorithms on the parallel for_each_client backend equal them on the sequential one.

The backend is chosen when an algorithm is built (``for_each_client`` reads it then). Clients
of different sizes (so different numbers of local steps, padded and masked in the parallel
program), a model that draws dropout from its rng, per-client inputs of several kinds (keys,
dicts with arrays, stored dataclass states).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_exp.algorithms import agnostic_fed_avg, apfl, fed_avg, scaffold
from fedjax_exp.core import client_datasets, for_each_client, models, optimizers

SIZES = {b"a": 7, b"b": 2, b"c": 11}
ROUNDS = [[b"a", b"b"], [b"c", b"a", b"b"]]
TRAIN = client_datasets.ShuffleRepeatBatchHParams(batch_size=3, num_epochs=2, seed=4)
PADDED = client_datasets.PaddedBatchHParams(batch_size=3)


def _loss(params, batch, rng):
    keep = jax.random.bernoulli(rng, 0.8, batch["x"].shape)
    logits = jnp.where(keep, batch["x"] / 0.8, 0.0) @ params["w"] + params["b"]
    log_probs = jax.nn.log_softmax(logits)
    return -jnp.take_along_axis(log_probs, batch["y"][:, None], axis=-1)[:, 0]


def _params():
    return {"w": 0.3 * jax.random.normal(jax.random.PRNGKey(1), (4, 3)), "b": jnp.zeros(3)}


def _data():
    rng = np.random.default_rng(0)
    return {
        cid: {
            "x": rng.normal(size=(n, 4)).astype(np.float32),
            "y": rng.integers(0, 3, size=n).astype(np.int32),
            "domain_id": rng.integers(0, 2, size=n).astype(np.int32),
        }
        for cid, n in SIZES.items()
    }


DATA = _data()

BUILDERS = {
    "fed_avg": lambda: fed_avg.federated_averaging(
        models.grad(_loss), optimizers.sgd(0.2, momentum=0.5), optimizers.adam(0.05), TRAIN
    ),
    "scaffold": lambda: scaffold.scaffold(
        models.grad(_loss), 0.1, optimizers.sgd(1.0), TRAIN, num_clients=3
    ),
    "agnostic_fed_avg": lambda: agnostic_fed_avg.agnostic_federated_averaging(
        _loss, optimizers.sgd(0.2), optimizers.sgd(1.0), TRAIN, PADDED, [0.4, 0.6], 0.5
    ),
    "apfl": lambda: apfl.adaptive_personalized_federated_learning(
        models.grad(_loss), optimizers.sgd(0.3), optimizers.sgd(1.0), TRAIN, 0.4
    ),
}


def _train(name, backend):
    with for_each_client.for_each_client_backend(backend):
        algorithm = BUILDERS[name]()
    state = algorithm.init(_params())
    for round_num, cohort in enumerate(ROUNDS):
        keys = jax.random.split(jax.random.PRNGKey(round_num), len(cohort))
        clients = [
            (cid, client_datasets.ClientDataset(DATA[cid]), key)
            for cid, key in zip(cohort, keys, strict=True)
        ]
        state, diagnostics = algorithm.apply(state, clients)
    return state, diagnostics


# FedAvg and SCAFFOLD (shared and per-client inputs) run by default; the dict and dataclass
# client inputs of AgnosticFedAvg and APFL compile longer, so they run with the slow tests.
@pytest.mark.parametrize(
    "name",
    [
        "fed_avg",
        "scaffold",
        pytest.param("agnostic_fed_avg", marks=pytest.mark.slow),
        pytest.param("apfl", marks=pytest.mark.slow),
    ],
)
def test_parallel_backend_equals_sequential(name):
    (sequential, seq_diag), (parallel, par_diag) = _train(name, "jit"), _train(name, "parallel")
    seq_leaves, par_leaves = (
        jax.tree_util.tree_leaves(sequential),
        jax.tree_util.tree_leaves(parallel),
    )
    assert jax.tree_util.tree_structure(sequential) == jax.tree_util.tree_structure(parallel)
    for a, b in zip(seq_leaves, par_leaves, strict=True):
        # Same arithmetic, but XLA may fuse the batched program differently: a few ulps.
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    assert list(seq_diag) == list(par_diag)
    for cid in seq_diag:
        for key in seq_diag[cid]:
            np.testing.assert_allclose(seq_diag[cid][key], par_diag[cid][key], rtol=1e-5)
