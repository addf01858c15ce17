"""Bad input to the federated algorithms: one clear error each.

- a client with zero examples in a round (every algorithm);
- client updates or stored per-client state whose parameter tree does not match the server's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

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
from fedjax_exp.algorithms._aggregation import RunningWeightedMean
from fedjax_exp.core import client_datasets, models, optimizers

TRAIN = client_datasets.ShuffleRepeatBatchHParams(batch_size=2, seed=0)
PADDED = client_datasets.PaddedBatchHParams(batch_size=2)


def _loss(params, batch, rng):
    del rng
    return (batch["x"] @ params["w"] + params["b"] - batch["y"]) ** 2


def _params():
    return {"w": jnp.ones(3), "b": jnp.zeros(())}


def _dataset(size):
    rng = np.random.default_rng(size)
    return client_datasets.ClientDataset(
        {
            "x": rng.normal(size=(size, 3)).astype(np.float32),
            "y": rng.normal(size=size).astype(np.float32),
            "domain_id": np.zeros(size, np.int32),
        }
    )


def _clients(*sizes):
    keys = jax.random.split(jax.random.PRNGKey(0), len(sizes))
    return [
        (f"c{i}".encode(), _dataset(n), k) for i, (n, k) in enumerate(zip(sizes, keys, strict=True))
    ]


GRAD = models.grad(_loss)
SGD = optimizers.sgd(0.1)

BUILDERS = {
    "fed_avg": lambda: (fed_avg.federated_averaging(GRAD, SGD, SGD, TRAIN), _params()),
    "fed_prox": lambda: (fed_prox.fed_prox(_loss, SGD, SGD, TRAIN, 0.1), _params()),
    "mime": lambda: (mime.mime(_loss, SGD, TRAIN, PADDED, 1.0), _params()),
    "mime_lite": lambda: (mime_lite.mime_lite(_loss, SGD, TRAIN, PADDED, 1.0), _params()),
    "agnostic_fed_avg": lambda: (
        agnostic_fed_avg.agnostic_federated_averaging(
            _loss, SGD, SGD, TRAIN, PADDED, [0.5, 0.5], 0.1
        ),
        _params(),
    ),
    "apfl": lambda: (
        apfl.adaptive_personalized_federated_learning(GRAD, SGD, SGD, TRAIN, 0.5),
        _params(),
    ),
    "hyp_cluster": lambda: (
        hyp_cluster.hyp_cluster(_loss, SGD, SGD, PADDED, TRAIN),
        [_params(), _params()],
    ),
    "scaffold": lambda: (scaffold.scaffold(GRAD, 0.1, SGD, TRAIN, num_clients=10), _params()),
    "dp_fed_avg": lambda: (
        dp_fed_avg.dp_federated_averaging(
            GRAD,
            SGD,
            SGD,
            TRAIN,
            clip_norm=1.0,
            noise_multiplier=1.0,
            num_clients=10,
            clients_per_round=2,
            target_delta=1e-5,
        ),
        _params(),
    ),
}


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_client_with_zero_examples_is_one_clear_error(name):
    algorithm, init_input = BUILDERS[name]()
    state = algorithm.init(init_input)
    with pytest.raises(ValueError, match=r"clients \[b'c1'\] have zero examples.*Drop empty"):
        algorithm.apply(state, _clients(3, 0))


def _optimizer_returning(transform):
    """A client optimizer whose step returns ``transform(params)``: a model/optimizer mix-up."""
    return optimizers.Optimizer(
        init=lambda params: (), apply=lambda grads, state, params: (state, transform(params))
    )


@pytest.mark.parametrize(
    ("transform", "problem"),
    [
        (lambda p: {**p, "extra": jnp.zeros(2)}, "tree structure"),
        # Without the check this one would broadcast silently: (1,) - (3,) is a valid subtraction.
        (lambda p: {**p, "w": p["w"][:1]}, r"leaf shapes \[\(\), \(1,\)\]"),
    ],
)
def test_trained_params_of_another_tree_are_one_clear_error(transform, problem):
    algorithm = fed_avg.federated_averaging(GRAD, _optimizer_returning(transform), SGD, TRAIN)
    # One local step each (2 examples, batch 2): the bad params reach client_final directly.
    with pytest.raises(
        ValueError, match=f"a client's trained params cannot be combined.*{problem}"
    ):
        algorithm.apply(algorithm.init(_params()), _clients(2, 2))


def test_stored_scaffold_control_variate_of_another_shape_is_one_clear_error():
    algorithm, params = BUILDERS["scaffold"]()
    state = algorithm.init(params)
    state = state.replace(client_control_variates={b"c0": {"w": jnp.zeros(4), "b": jnp.zeros(())}})
    with pytest.raises(ValueError, match=r"stored control variate of client b'c0' cannot be"):
        algorithm.apply(state, _clients(3, 2))


def test_stored_apfl_client_state_of_another_model_is_one_clear_error():
    algorithm, params = BUILDERS["apfl"]()
    state = algorithm.init(params)
    stale = apfl.ClientState({"w": jnp.zeros(3)}, {"w": 0.5})
    state = state.replace(client_states={b"c1": stale})
    with pytest.raises(ValueError, match=r"stored params of client b'c1' cannot be.*structure"):
        algorithm.apply(state, _clients(3, 2))


def test_aggregating_an_update_of_another_tree_names_the_client():
    mean = RunningWeightedMean(_params())
    mean.add(b"good", _params(), 1.0)
    with pytest.raises(ValueError, match=r"the update of client b'bad' cannot be combined"):
        mean.add(b"bad", {"w": jnp.ones(3)}, 1.0)
