"""The cohort engine equals the library: the same clients, batches and keys as the samplers and
``shuffle_repeat_batch``, and rounds of every algorithm equal the library algorithm's ``apply``
(sequential jit backend) on the same clients, for both engine layouts and any lane count."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_exp.algorithms import dp_fed_avg, fed_avg, fed_prox, mime, mime_lite, scaffold
from fedjax_exp.core import client_samplers, cohort, models, optimizers
from fedjax_exp.core.client_datasets import (
    ClientDataset,
    PaddedBatchHParams,
    ShuffleRepeatBatchHParams,
)
from fedjax_exp.experiment.federated import FederatedTraining

SEED = 3
COHORT = 4
BATCH = 16


@pytest.fixture(scope="module")
def data():
    from fedjax_exp.datasets import sample
    from fedjax_exp.models import emnist

    train, _ = sample.load_data()
    return emnist.create_logistic_model(), train


@pytest.mark.parametrize(
    "hparams",
    [
        ShuffleRepeatBatchHParams(batch_size=4, num_epochs=1, seed=7),
        ShuffleRepeatBatchHParams(batch_size=4, num_epochs=3, seed=1, drop_remainder=True),
        ShuffleRepeatBatchHParams(batch_size=5, num_epochs=None, num_steps=9, seed=2),
        ShuffleRepeatBatchHParams(batch_size=3, num_epochs=2, num_steps=4, skip_shuffle=True),
    ],
)
def test_shuffle_repeat_rows_are_the_library_batches(hparams):
    dataset = ClientDataset({"i": np.arange(11)})
    expected = [b["i"] for b in dataset.shuffle_repeat_batch(hparams)]
    np.testing.assert_array_equal(cohort.shuffle_repeat_rows(11, hparams), np.stack(expected))


def test_padded_batch_rows_are_the_library_batches():
    dataset = ClientDataset({"i": np.arange(1, 12)})
    batches = list(dataset.padded_batch(PaddedBatchHParams(batch_size=4)))
    rows, mask = cohort.padded_batch_rows(11, 4)
    np.testing.assert_array_equal(mask, np.stack([b["__mask__"] for b in batches]))
    np.testing.assert_array_equal(np.where(mask, rows + 1, 0), np.stack([b["i"] for b in batches]))


def test_planner_draws_the_sampler_clients(data):
    _, train = data
    offsets = np.asarray(train.offsets)
    planner = cohort.CohortPlanner(offsets, 5, ShuffleRepeatBatchHParams(batch_size=8), lanes=2)
    ids = list(train.client_ids())
    sampler = client_samplers.UniformGetClientSampler(train, 5, SEED)
    for round_num in range(3):
        expected = [cid for cid, _, _ in sampler.sample()]
        assert [ids[i] for i in planner.sample(SEED, round_num)] == expected
        plan = planner.plan(SEED, round_num)
        real = plan["real"].reshape(-1)
        lanes_clients = plan["clients"].reshape(-1)[real]
        slots = plan["slot"].reshape(-1)[real]
        assert [ids[c] for c in lanes_clients] == [expected[s] for s in slots]
        # Longest clients first; padding lanes take no step and weigh nothing.
        counts = plan["train"]["counts"].reshape(-1)
        assert list(counts[real]) == sorted(counts[real], reverse=True)
        assert not counts[~real].any() and not plan["weights"].reshape(-1)[~real].any()


def _settings(name):
    return {
        "fed_avg": {},
        "fed_prox": {"proximal_weight": 0.5},
        "scaffold": {"client_learning_rate": 0.05},
        "dp_fed_avg": {"clip_norm": 0.3, "noise_multiplier": 0.2, "target_delta": 1e-3},
        "mime": {"server_learning_rate": 0.7, "grads_batch_size": 64},
        "mime_lite": {
            "server_learning_rate": 0.7,
            "grads_batch_size": 64,
            "client_delta_clip_norm": 0.2,
        },
    }[name]


def _library_algorithm(name, model, client_opt, server_opt, hparams, num_clients, settings):
    grad_fn, loss = models.model_grad(model), models.model_per_example_loss(model)
    if name == "fed_avg":
        return fed_avg.federated_averaging(grad_fn, client_opt, server_opt, hparams)
    if name == "fed_prox":
        return fed_prox.fed_prox(loss, client_opt, server_opt, hparams, **settings)
    if name == "scaffold":
        return scaffold.scaffold(
            grad_fn, settings["client_learning_rate"], server_opt, hparams, num_clients
        )
    if name == "dp_fed_avg":
        return dp_fed_avg.dp_federated_averaging(
            grad_fn,
            client_opt,
            server_opt,
            hparams,
            num_clients=num_clients,
            clients_per_round=COHORT,
            **settings,
        )
    grads = PaddedBatchHParams(batch_size=settings["grads_batch_size"])
    if name == "mime":
        return mime.mime(loss, server_opt, hparams, grads, settings["server_learning_rate"])
    return mime_lite.mime_lite(
        loss,
        server_opt,
        hparams,
        grads,
        settings["server_learning_rate"],
        client_delta_clip_norm=settings["client_delta_clip_norm"],
    )


def _server_optimizer(name):
    # Mime's is the base optimizer, whose learning rate is the clients' step size.
    return optimizers.sgd(0.1) if name.startswith("mime") else optimizers.adagrad(0.5)


def _engine_rounds(model, train, name, engine, lanes, rounds, per_dispatch, settings):
    training = FederatedTraining(
        model,
        _server_optimizer(name),
        train,
        name=name,
        clients_per_round=COHORT,
        client_batch_size=BATCH,
        client_optimizer=optimizers.sgd(0.1),
        engine=engine,
        lanes=lanes,
        **settings,
    )
    state = training.init(jax.random.PRNGKey(0))
    stream = training.data_stream(SEED, 0)
    losses = []
    for first in range(0, rounds, per_dispatch):
        block = training.prepare([next(stream) for _ in range(per_dispatch)])
        state, scalars = training.run_steps(state, block, jax.random.PRNGKey(9), first + 1)
        losses.extend(np.asarray(scalars["loss"]).tolist())
    return training, state, losses


def _assert_close(actual, expected, atol=1e-5):
    # Float tolerance: the engine sums client updates in another order; Adam on the server
    # divides by sqrt(v), which magnifies that rounding for tiny coordinates.
    jax.tree_util.tree_map(
        lambda a, e: np.testing.assert_allclose(np.asarray(a), np.asarray(e), atol=atol, rtol=1e-4),
        actual,
        expected,
    )


@pytest.mark.parametrize(
    "name", ["fed_avg", "fed_prox", "scaffold", "dp_fed_avg", "mime", "mime_lite"]
)
def test_rounds_equal_the_library_algorithm(data, name):
    model, train = data
    settings = _settings(name) | ({"noise_seed": 5} if name == "dp_fed_avg" else {})
    training, state, losses = _engine_rounds(model, train, name, "scan", 3, 3, 3, settings)
    server_opt = _server_optimizer(name)
    sampler = client_samplers.UniformGetClientSampler(train, COHORT, SEED)
    reference = None
    for round_num in range(3):
        hparams = dataclasses.replace(
            training.batch_hparams, seed=cohort.round_shuffle_seed(SEED, round_num)
        )
        algorithm = _library_algorithm(
            name, model, optimizers.sgd(0.1), server_opt, hparams, train.num_clients(), settings
        )
        if reference is None:
            reference = algorithm.init(model.init(jax.random.PRNGKey(0)))
        reference, _ = algorithm.apply(reference, sampler.sample())
    _assert_close(state.params, reference.params)
    if name != "dp_fed_avg":
        _assert_close(state.opt_state, reference.opt_state)
    else:
        np.testing.assert_array_equal(state.noise_rng, reference.noise_rng)
    if name == "scaffold":
        _assert_close(state.control_variate, reference.control_variate)
        ids = list(train.client_ids())
        assert len(reference.client_control_variates) > COHORT  # Several rounds' clients.
        for client_id, variate in reference.client_control_variates.items():
            index = ids.index(client_id)
            stored = jax.tree_util.tree_map(lambda c: c[index], state.client_control_variates)  # noqa: B023
            _assert_close(stored, variate)
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]


@pytest.mark.parametrize(
    "name", ["fed_avg", "scaffold", pytest.param("mime", marks=pytest.mark.slow)]
)
def test_layouts_and_lane_counts_give_the_same_rounds(data, name):
    """One program for 2 rounds with 3 lanes (one padding lane) equals 4 lanes, one
    round per dispatch, and the stepwise layout with 1 lane (clients one by one)."""
    model, train = data
    settings = _settings(name)
    _, base, base_losses = _engine_rounds(model, train, name, "scan", 3, 2, 2, settings)
    for engine, lanes, per_dispatch in [("scan", 4, 1), ("stepwise", 1, 2)]:
        _, state, losses = _engine_rounds(
            model, train, name, engine, lanes, 2, per_dispatch, settings
        )
        _assert_close(state, base)
        np.testing.assert_allclose(losses, base_losses, rtol=1e-5)


def test_client_loss_is_the_mean_loss_before_each_step(data):
    """The logged round loss: the mean over all real local steps of the batch loss taken
    before the step (one client, one step each: the loss at the server params)."""
    model, train = data
    training = FederatedTraining(
        model,
        optimizers.sgd(1.0),
        train,
        name="fed_avg",
        clients_per_round=1,
        client_batch_size=8,
        client_optimizer=optimizers.sgd(0.1),
        client_epochs=None,
        client_steps=1,
        engine="scan",
    )
    params = model.init(jax.random.PRNGKey(0))
    state = training.init(jax.random.PRNGKey(0))
    plan = next(training.data_stream(SEED, 0))
    _, scalars = training.run_steps(state, training.prepare([plan]), None, 1)
    rows = plan["train"]["rows"][0, 0, 0]
    batch = {k: jnp.asarray(v[rows]) for k, v in training.host_columns.items()}
    expected = jnp.mean(models.model_per_example_loss(model)(params, batch, None))
    np.testing.assert_allclose(float(scalars["loss"][0]), float(expected), rtol=1e-6)
