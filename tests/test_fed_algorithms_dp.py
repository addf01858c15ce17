"""DP-FedAvg: clipping bounds, noise statistics, and epsilon against dp-accounting."""

from __future__ import annotations

import logging

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from dp_accounting import pld, rdp

from fedjax_exp.algorithms import dp_fed_avg, fed_avg
from fedjax_exp.core import client_datasets, models, optimizers

NUM_FEATURES = 40
NUM_CLASSES = 25
HPARAMS = client_datasets.ShuffleRepeatBatchHParams(batch_size=3, num_epochs=2, seed=1)


def _per_example_loss(params, batch, rng):
    del rng
    logits = batch["x"] @ params["w"] + params["b"]
    log_probs = jax.nn.log_softmax(logits)
    return -jnp.take_along_axis(log_probs, batch["y"][:, None], axis=-1)[:, 0]


def _params():
    key = jax.random.PRNGKey(0)
    return {
        "w": 0.1 * jax.random.normal(key, (NUM_FEATURES, NUM_CLASSES)),
        "b": jnp.zeros(NUM_CLASSES),
    }


def _clients(round_num, sizes=(5, 8, 3, 6)):
    rng = np.random.default_rng(round_num)
    keys = jax.random.split(jax.random.PRNGKey(round_num), len(sizes))
    clients = []
    for i, (size, key) in enumerate(zip(sizes, keys, strict=True)):
        data = {
            "x": rng.normal(size=(size, NUM_FEATURES)).astype(np.float32),
            "y": rng.integers(0, NUM_CLASSES, size=size).astype(np.int32),
        }
        clients.append(
            (f"client{round_num}_{i}".encode(), client_datasets.ClientDataset(data), key)
        )
    return clients


def _dp(client_lr=0.5, **kwargs):
    arguments = dict(
        clip_norm=0.05,
        noise_multiplier=0.0,
        num_clients=100,
        clients_per_round=4,
        target_delta=1e-5,
    )
    arguments.update(kwargs)
    return dp_fed_avg.dp_federated_averaging(
        models.grad(_per_example_loss),
        optimizers.sgd(client_lr),
        optimizers.sgd(1.0),
        HPARAMS,
        **arguments,
    )


def _clip(tree, clip_norm):
    leaves = [np.asarray(leaf, np.float64) for leaf in jax.tree_util.tree_leaves(tree)]
    norm = np.sqrt(sum(np.sum(leaf**2) for leaf in leaves))
    return [leaf * min(1.0, clip_norm / norm) for leaf in leaves]


def test_clipped_updates_never_exceed_the_clip_and_are_averaged_uniformly():
    clip_norm = 0.05
    algorithm = _dp(clip_norm=clip_norm)
    state = algorithm.init(_params())
    clients = _clients(0)
    next_state, diagnostics = algorithm.apply(state, clients)

    for d in diagnostics.values():
        # float32 rounding of the rescaled tree may land a hair above the bound, no more.
        assert float(d["clipped_delta_l2_norm"]) <= clip_norm * (1 + 1e-6)
        assert bool(d["clipped"]) == (float(d["delta_l2_norm"]) > clip_norm)
    assert sum(bool(d["clipped"]) for d in diagnostics.values()) >= 2

    # Without noise, the server step (SGD, learning rate 1) is the plain mean of the clipped
    # client deltas, each computed by FedAvg's client training and clipped here in float64.
    train = fed_avg.create_train_for_each_client(
        models.grad(_per_example_loss), optimizers.sgd(0.5)
    )
    batched = [(cid, ds.shuffle_repeat_batch(HPARAMS), key) for cid, ds, key in clients]
    clipped = [_clip(delta, clip_norm) for _, delta in train(state.params, batched)]
    expected_mean = [np.mean(parts, axis=0) for parts in zip(*clipped, strict=True)]
    start = jax.tree_util.tree_leaves(state.params)
    moved = jax.tree_util.tree_leaves(next_state.params)
    for before, after, mean in zip(start, moved, expected_mean, strict=True):
        np.testing.assert_allclose(np.asarray(before) - np.asarray(after), mean, atol=1e-7)


def test_noise_standard_deviation_within_sampling_error():
    # Clients that do not move (client learning rate 0): the server step is the noise alone.
    noise_multiplier, clip_norm, cohort = 1.3, 0.5, 4
    algorithm = _dp(client_lr=0.0, clip_norm=clip_norm, noise_multiplier=noise_multiplier)
    params = _params()
    state = algorithm.init(params)
    expected_std = noise_multiplier * clip_norm / cohort
    draws = []
    for round_num in range(2):
        previous = state.params
        state, _ = algorithm.apply(state, _clients(round_num))
        noise = np.concatenate(
            [
                (np.asarray(a) - np.asarray(b)).ravel()
                for a, b in zip(
                    jax.tree_util.tree_leaves(previous),
                    jax.tree_util.tree_leaves(state.params),
                    strict=True,
                )
            ]
        )
        n = noise.size  # 40 * 25 + 25 = 1025 coordinates
        # Standard errors of the sample mean and standard deviation of n normal draws.
        assert abs(noise.mean()) < 4 * expected_std / np.sqrt(n)
        assert abs(noise.std() - expected_std) < 4 * expected_std / np.sqrt(2 * n)
        draws.append(noise)
    # Fresh noise every round, from the key carried in the state.
    assert not np.allclose(draws[0], draws[1])
    assert abs(np.corrcoef(draws[0], draws[1])[0, 1]) < 4 / np.sqrt(draws[0].size)


def test_same_seed_same_noise_different_seed_different_noise():
    finals = []
    for seed in (3, 3, 4):
        algorithm = _dp(client_lr=0.0, clip_norm=1.0, noise_multiplier=1.0, noise_seed=seed)
        state, _ = algorithm.apply(algorithm.init(_params()), _clients(0))
        finals.append(np.asarray(state.params["w"]))
    np.testing.assert_array_equal(finals[0], finals[1])
    assert not np.allclose(finals[0], finals[2])


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_epsilon_equals_dp_accounting_value(accountant):
    noise_multiplier, num_clients, cohort, delta = 1.1, 100, 4, 1e-5
    algorithm = _dp(
        noise_multiplier=noise_multiplier,
        clip_norm=0.1,
        num_clients=num_clients,
        clients_per_round=cohort,
        target_delta=delta,
        accountant=accountant,
    )
    state = algorithm.init(_params())
    assert state.epsilon == 0.0 and state.num_rounds == 0
    # The reference composes one sampled Gaussian event per round, as it happens.
    reference = rdp.RdpAccountant() if accountant == "rdp" else pld.PLDAccountant()
    round_event = dp_accounting.PoissonSampledDpEvent(
        cohort / num_clients, dp_accounting.GaussianDpEvent(noise_multiplier)
    )
    epsilons = []
    for round_num in range(3):
        state, _ = algorithm.apply(state, _clients(round_num))
        reference.compose(round_event)
        expected = reference.get_epsilon(delta)
        assert state.num_rounds == round_num + 1
        np.testing.assert_allclose(state.epsilon, expected, rtol=1e-9)
        epsilons.append(state.epsilon)
    assert 0 < epsilons[0] < epsilons[1] < epsilons[2]


def test_small_noise_epsilon_is_the_accountants_without_its_convergence_warnings(caplog):
    """At noise 0.5 the RDP accountant warns once per Renyi order it leaves out (6 lines per
    round on the console); epsilon_spent keeps the value and drops those warnings only."""
    reference = rdp.RdpAccountant()
    reference.compose(
        dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(0.25, dp_accounting.GaussianDpEvent(0.5)), 3
        )
    )
    with caplog.at_level("WARNING", logger="absl"):
        expected = reference.get_epsilon(1e-5)
        assert any("failed to converge" in r.getMessage() for r in caplog.records)
        caplog.clear()
        spent = dp_fed_avg.epsilon_spent(0.5, 0.25, 3, 1e-5)
        logging.getLogger("absl").warning("another warning")
    assert spent == pytest.approx(expected, rel=1e-12)
    assert [r.getMessage() for r in caplog.records] == ["another warning"]


def test_epsilon_spent_edge_cases():
    assert dp_fed_avg.epsilon_spent(1.0, 0.1, 0, 1e-5) == 0.0
    assert dp_fed_avg.epsilon_spent(0.0, 0.1, 5, 1e-5) == float("inf")
    with pytest.raises(ValueError, match="accountant must be one of"):
        dp_fed_avg.epsilon_spent(1.0, 0.1, 5, 1e-5, accountant="moments")


def test_noise_without_clip_is_one_clear_error():
    with pytest.raises(ValueError, match="noise_multiplier=1.0 needs a clip_norm"):
        _dp(clip_norm=None, noise_multiplier=1.0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"noise_multiplier": -0.1}, "noise_multiplier must be >= 0"),
        ({"clip_norm": 0.0}, "clip_norm must be > 0"),
        ({"clients_per_round": 101}, "clients_per_round <= num_clients"),
        ({"target_delta": 1.0}, "target_delta must be in"),
        ({"accountant": "moments"}, "accountant must be one of"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        _dp(**kwargs)


def test_round_size_must_match_the_accounted_cohort():
    algorithm = _dp(noise_multiplier=1.0, clip_norm=1.0)
    with pytest.raises(ValueError, match="clients_per_round=4 but this round has 3 clients"):
        algorithm.apply(algorithm.init(_params()), _clients(0, sizes=(3, 4, 5)))


def test_without_clip_or_noise_it_is_uniformly_weighted_fedavg():
    algorithm = _dp(clip_norm=None, noise_multiplier=0.0)
    state, diagnostics = algorithm.apply(algorithm.init(_params()), _clients(0))
    assert state.epsilon == float("inf")
    assert all(set(d) == {"delta_l2_norm"} for d in diagnostics.values())
