"""SCAFFOLD against a NumPy transcription of the paper's update rules (option II).

Linear regression, three clients of different sizes (so different numbers of local steps K_i),
two rounds with a client shared between them (its control variate carries over), a cohort
smaller than the population (so c moves by |S|/N of the mean variate change).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_exp.algorithms import scaffold
from fedjax_exp.core import client_datasets, models, optimizers, serialization

NUM_FEATURES = 3
CLIENT_SIZES = {b"a": 4, b"b": 5, b"c": 3}
ROUNDS = [[b"a", b"b"], [b"b", b"c"]]
NUM_CLIENTS = len(CLIENT_SIZES)
BATCH_SIZE = 2
CLIENT_LR = 0.1
SERVER_LR = 0.7


def _data() -> dict[bytes, dict[str, np.ndarray]]:
    rng = np.random.default_rng(7)
    true_w = np.array([1.0, -2.0, 0.5])
    data = {}
    for i, (cid, size) in enumerate(CLIENT_SIZES.items()):
        # Shifted inputs and offsets per client: heterogeneous clients, where drift matters.
        x = rng.normal(loc=i, size=(size, NUM_FEATURES)).astype(np.float32)
        y = (x @ true_w + 0.3 * i + 0.1 * rng.normal(size=size)).astype(np.float32)
        data[cid] = {"x": x, "y": y}
    return data


DATA = _data()


def _per_example_loss(params, batch, rng):
    del rng
    residual = batch["x"] @ params["w"] + params["b"] - batch["y"]
    return 0.5 * residual**2


HPARAMS = client_datasets.ShuffleRepeatBatchHParams(
    batch_size=BATCH_SIZE, num_epochs=1, skip_shuffle=True
)


def _initial_params():
    return {"w": jnp.array([0.2, 0.1, -0.3]), "b": jnp.array(0.05)}


def _clients(round_num):
    ids = ROUNDS[round_num]
    rngs = jax.random.split(jax.random.PRNGKey(round_num), len(ids))
    return [
        (cid, client_datasets.ClientDataset(DATA[cid]), r) for cid, r in zip(ids, rngs, strict=True)
    ]


def _algorithm():
    return scaffold.scaffold(
        models.grad(_per_example_loss),
        client_learning_rate=CLIENT_LR,
        server_optimizer=optimizers.sgd(SERVER_LR),
        client_batch_hparams=HPARAMS,
        num_clients=NUM_CLIENTS,
    )


# --- The reference: parameters as one float64 vector [w..., b]. -------------------------------


def _np_batches(cid):
    """skip_shuffle batches: the stored order repeated, ceil(n / batch) batches of one epoch."""
    x, y = DATA[cid]["x"].astype(np.float64), DATA[cid]["y"].astype(np.float64)
    n = len(y)
    num_steps = -(-n // BATCH_SIZE)
    order = np.concatenate([np.arange(n)] * 2)
    return [
        (
            x[order[k * BATCH_SIZE : (k + 1) * BATCH_SIZE]],
            y[order[k * BATCH_SIZE : (k + 1) * BATCH_SIZE]],
        )
        for k in range(num_steps)
    ]


def _np_grad(theta, x, y):
    residual = x @ theta[:-1] + theta[-1] - y
    return np.concatenate([x.T @ residual / len(y), [residual.mean()]])


def _np_scaffold(theta):
    c = np.zeros_like(theta)
    c_clients = {}
    history = []
    for cohort in ROUNDS:
        deltas, control_changes = [], []
        for cid in cohort:
            c_i = c_clients.get(cid, np.zeros_like(theta))
            y = theta.copy()
            batches = _np_batches(cid)
            for x_b, y_b in batches:
                y = y - CLIENT_LR * (_np_grad(y, x_b, y_b) - c_i + c)
            c_i_plus = c_i - c + (theta - y) / (len(batches) * CLIENT_LR)
            deltas.append(y - theta)
            control_changes.append(c_i_plus - c_i)
            c_clients[cid] = c_i_plus
        theta = theta + SERVER_LR * np.mean(deltas, axis=0)
        c = c + len(cohort) / NUM_CLIENTS * np.mean(control_changes, axis=0)
        history.append((theta.copy(), c.copy(), dict(c_clients)))
    return history


def _flat(params):
    return np.concatenate([np.asarray(params["w"], np.float64), [float(params["b"])]])


def test_scaffold_matches_numpy_reference():
    algorithm = _algorithm()
    state = algorithm.init(_initial_params())
    expected = _np_scaffold(_flat(_initial_params()))
    for round_num, (theta, c, c_clients) in enumerate(expected):
        state, diagnostics = algorithm.apply(state, _clients(round_num))
        assert sorted(diagnostics) == sorted(ROUNDS[round_num])
        np.testing.assert_allclose(_flat(state.params), theta, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(_flat(state.control_variate), c, rtol=1e-5, atol=1e-6)
        assert sorted(state.client_control_variates) == sorted(c_clients)
        for cid, c_i in c_clients.items():
            np.testing.assert_allclose(
                _flat(state.client_control_variates[cid]), c_i, rtol=1e-5, atol=1e-6
            )
    # The control variates are doing something: c is far from zero after two rounds.
    assert np.linalg.norm(_flat(state.control_variate)) > 0.1


def test_scaffold_state_survives_save_and_load(tmp_path):
    algorithm = _algorithm()
    state, _ = algorithm.apply(algorithm.init(_initial_params()), _clients(0))
    path = tmp_path / "state.pkl"
    serialization.save_state(state, path)
    restored = serialization.load_state(path)
    uninterrupted, _ = algorithm.apply(state, _clients(1))
    resumed, _ = algorithm.apply(restored, _clients(1))
    for a, b in zip(
        jax.tree_util.tree_leaves(uninterrupted), jax.tree_util.tree_leaves(resumed), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_scaffold_rejects_bad_arguments():
    with pytest.raises(ValueError, match="client_learning_rate must be > 0"):
        scaffold.scaffold(models.grad(_per_example_loss), 0.0, optimizers.sgd(1.0), HPARAMS, 3)
    with pytest.raises(ValueError, match="num_clients must be a positive int"):
        scaffold.scaffold(models.grad(_per_example_loss), 0.1, optimizers.sgd(1.0), HPARAMS, 0)
    small = scaffold.scaffold(
        models.grad(_per_example_loss), 0.1, optimizers.sgd(1.0), HPARAMS, num_clients=1
    )
    with pytest.raises(ValueError, match="a round has 2 clients but .* num_clients=1"):
        small.apply(small.init(_initial_params()), _clients(0))
