"""Parity with FedJAX 0.0.17: every algorithm, one and several rounds, on identical inputs.

Both libraries get the same tiny model (a linear softmax classifier with input dropout, so the
client rngs matter), the same client data, batching seeds, client rngs and optimizers; the
server states and client diagnostics must be equal bit for bit after every round.
"""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

fedjax = pytest.importorskip("fedjax")

from fedjax_exp.algorithms import (  # noqa: E402
    agnostic_fed_avg,
    apfl,
    fed_avg,
    fed_prox,
    hyp_cluster,
    mime,
    mime_lite,
)
from fedjax_exp.core import client_datasets, metrics, models, optimizers  # noqa: E402

NUM_FEATURES = 5
NUM_CLASSES = 3
NUM_DOMAINS = 2
CLIENT_SIZES = {b"c0": 7, b"c1": 3, b"c2": 12, b"c3": 5}
# Clients recur across rounds, so per-client state (APFL) and cluster moves (HypCluster) carry.
ROUNDS = [[b"c0", b"c2"], [b"c1", b"c2", b"c3"]]


@pytest.fixture(autouse=True)
def _fedjax_apfl_on_current_jax(fedjax_on_current_jax, monkeypatch):
    # FedJAX's APFL clips with jnp.clip(a_min=..., a_max=...), keywords current JAX removed
    # (now min/max). Give that one module a jnp whose clip still takes them.
    from fedjax.algorithms import apfl as their_apfl

    def clip(x, min=None, max=None, *, a_min=None, a_max=None):  # noqa: A002
        return jnp.clip(x, a_min if a_min is not None else min, a_max if a_max is not None else max)

    patched_jnp = types.SimpleNamespace(**{**vars(jnp), "clip": clip})
    monkeypatch.setattr(their_apfl, "jnp", patched_jnp)


def _init(rng):
    w_rng, b_rng = jax.random.split(rng)
    return {
        "dense": {
            "w": 0.5 * jax.random.normal(w_rng, (NUM_FEATURES, NUM_CLASSES)),
            "b": 0.1 * jax.random.normal(b_rng, (NUM_CLASSES,)),
        }
    }


def _apply_for_train(params, batch, rng):
    x = batch["x"]
    if rng is not None:
        keep = jax.random.bernoulli(rng, 0.75, x.shape)
        x = jnp.where(keep, x / 0.75, 0.0)
    return x @ params["dense"]["w"] + params["dense"]["b"]


def _apply_for_eval(params, batch):
    return _apply_for_train(params, batch, None)


def _train_loss(batch, logits):
    log_probs = jax.nn.log_softmax(logits)
    return -jnp.take_along_axis(log_probs, batch["y"][:, None], axis=-1)[:, 0]


def _library(name: str) -> types.SimpleNamespace:
    """The pieces each test needs, from fedjax_exp ('ours') or FedJAX ('theirs')."""
    if name == "ours":
        lib = types.SimpleNamespace(
            ClientDataset=client_datasets.ClientDataset,
            ShuffleRepeatBatchHParams=client_datasets.ShuffleRepeatBatchHParams,
            PaddedBatchHParams=client_datasets.PaddedBatchHParams,
            optimizers=optimizers,
            models=models,
            metrics=metrics,
            Model=models.Model,
            fed_avg=fed_avg,
            fed_prox=fed_prox,
            mime=mime,
            mime_lite=mime_lite,
            hyp_cluster=hyp_cluster,
            agnostic_fed_avg=agnostic_fed_avg,
            apfl=apfl,
        )
    else:
        from fedjax import algorithms as their_algorithms
        from fedjax.algorithms import apfl as their_apfl
        from fedjax.core import models as their_models

        lib = types.SimpleNamespace(
            ClientDataset=fedjax.ClientDataset,
            ShuffleRepeatBatchHParams=fedjax.ShuffleRepeatBatchHParams,
            PaddedBatchHParams=fedjax.PaddedBatchHParams,
            optimizers=fedjax.optimizers,
            models=their_models,
            metrics=fedjax.metrics,
            Model=fedjax.Model,
            fed_avg=their_algorithms.fed_avg,
            fed_prox=their_algorithms.fed_prox,
            mime=their_algorithms.mime,
            mime_lite=their_algorithms.mime_lite,
            hyp_cluster=their_algorithms.hyp_cluster,
            agnostic_fed_avg=their_algorithms.agnostic_fed_avg,
            apfl=their_apfl,
        )
    lib.model = lib.Model(
        init=_init,
        apply_for_train=_apply_for_train,
        apply_for_eval=_apply_for_eval,
        train_loss=_train_loss,
        eval_metrics={
            "loss": lib.metrics.CrossEntropyLoss(),
            "accuracy": lib.metrics.Accuracy(),
        },
    )
    lib.train_hparams = lib.ShuffleRepeatBatchHParams(batch_size=4, num_epochs=2, seed=11)
    lib.padded_hparams = lib.PaddedBatchHParams(batch_size=4)
    return lib


def _examples() -> dict[bytes, dict[str, np.ndarray]]:
    rng = np.random.default_rng(2024)
    data = {}
    for cid, size in CLIENT_SIZES.items():
        data[cid] = {
            "x": rng.normal(size=(size, NUM_FEATURES)).astype(np.float32),
            "y": rng.integers(0, NUM_CLASSES, size=size).astype(np.int32),
            "domain_id": rng.integers(0, NUM_DOMAINS, size=size).astype(np.int32),
        }
    return data


EXAMPLES = _examples()


def _round_clients(lib, round_num: int):
    client_ids = ROUNDS[round_num]
    rngs = jax.random.split(jax.random.PRNGKey(round_num), len(client_ids))
    return [
        (cid, lib.ClientDataset(EXAMPLES[cid]), rng)
        for cid, rng in zip(client_ids, rngs, strict=True)
    ]


def _run(lib, algorithm, init_input, num_rounds: int):
    """``[(state, diagnostics, client_states)]`` after each round.

    FedJAX's APFL updates its state's ``client_states`` dict in place, so every round's state
    shares one dict; a copy taken right after each round is what the round left.
    """
    state = algorithm.init(init_input)
    history = []
    for round_num in range(num_rounds):
        state, diagnostics = algorithm.apply(state, _round_clients(lib, round_num))
        history.append((state, diagnostics, dict(getattr(state, "client_states", {}))))
    return history


def _assert_bitwise_equal(ours, theirs, what: str):
    our_leaves = jax.tree_util.tree_leaves(ours)
    their_leaves = jax.tree_util.tree_leaves(theirs)
    assert len(our_leaves) == len(their_leaves), what
    for i, (a, b) in enumerate(zip(our_leaves, their_leaves, strict=True)):
        assert np.shape(a) == np.shape(b), f"{what}: leaf {i}"
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=f"{what}: leaf {i}")


def _assert_same_history(ours, theirs, state_fields):
    assert len(ours) == len(theirs)
    for round_num, ((our_state, our_diag, _), (their_state, their_diag, _)) in enumerate(
        zip(ours, theirs, strict=True)
    ):
        for field in state_fields:
            _assert_bitwise_equal(
                getattr(our_state, field),
                getattr(their_state, field),
                f"round {round_num}: state.{field}",
            )
        assert list(our_diag) == list(their_diag)
        for cid in our_diag:
            assert sorted(our_diag[cid]) == sorted(their_diag[cid])
            for key in our_diag[cid]:
                _assert_bitwise_equal(
                    our_diag[cid][key], their_diag[cid][key], f"round {round_num}: {cid} {key}"
                )


def _both(build, init_input=None):
    """Runs the algorithm ``build`` makes in both libraries; states are compared every round."""
    histories = []
    for name in ("ours", "theirs"):
        lib = _library(name)
        algorithm = build(lib)
        start = lib.model.init(jax.random.PRNGKey(0)) if init_input is None else init_input(lib)
        histories.append(_run(lib, algorithm, start, len(ROUNDS)))
    return histories


def test_fed_avg_matches_fedjax():
    def build(lib):
        return lib.fed_avg.federated_averaging(
            lib.models.model_grad(lib.model),
            lib.optimizers.sgd(0.2, momentum=0.5),
            lib.optimizers.adam(0.05),
            lib.train_hparams,
        )

    ours, theirs = _both(build)
    _assert_same_history(ours, theirs, ["params", "opt_state"])
    # The rounds really train: the params move.
    start = _init(jax.random.PRNGKey(0))
    assert not np.allclose(ours[-1][0].params["dense"]["w"], start["dense"]["w"])


def test_fed_prox_matches_fedjax():
    def build(lib):
        return lib.fed_prox.fed_prox(
            lib.models.model_per_example_loss(lib.model),
            lib.optimizers.sgd(0.2),
            lib.optimizers.sgd(1.0),
            lib.train_hparams,
            proximal_weight=0.3,
        )

    ours, theirs = _both(build)
    _assert_same_history(ours, theirs, ["params", "opt_state"])


def test_mime_matches_fedjax():
    def build(lib):
        return lib.mime.mime(
            lib.models.model_per_example_loss(lib.model),
            lib.optimizers.sgd(0.1, momentum=0.9),
            lib.train_hparams,
            lib.padded_hparams,
            server_learning_rate=0.8,
            regularizer=lambda params: 0.01 * jnp.sum(params["dense"]["w"] ** 2),
        )

    ours, theirs = _both(build)
    _assert_same_history(ours, theirs, ["params", "opt_state"])


@pytest.mark.parametrize("clip", [None, 0.05])
def test_mime_lite_matches_fedjax(clip):
    def build(lib):
        return lib.mime_lite.mime_lite(
            lib.models.model_per_example_loss(lib.model),
            lib.optimizers.adam(0.05),
            lib.train_hparams,
            lib.padded_hparams,
            server_learning_rate=0.9,
            client_delta_clip_norm=clip,
        )

    ours, theirs = _both(build)
    _assert_same_history(ours, theirs, ["params", "opt_state"])
    if clip is not None:
        # The clip binds for some client, so the clipped path is exercised.
        assert any(bool(d["clipped"]) for _, diag, _ in ours for d in diag.values())


def test_agnostic_fed_avg_matches_fedjax():
    def build(lib):
        return lib.agnostic_fed_avg.agnostic_federated_averaging(
            lib.models.model_per_example_loss(lib.model),
            lib.optimizers.sgd(0.2),
            lib.optimizers.sgd(1.0, momentum=0.3),
            lib.train_hparams,
            lib.padded_hparams,
            init_domain_weights=[0.3, 0.7],
            domain_learning_rate=0.5,
            domain_window_size=2,
            init_domain_window=[2.0, 3.0],
        )

    ours, theirs = _both(build)
    _assert_same_history(ours, theirs, ["params", "opt_state", "domain_weights", "domain_window"])
    assert not np.allclose(ours[-1][0].domain_weights, [0.3, 0.7])


def test_apfl_matches_fedjax():
    def build(lib):
        return lib.apfl.adaptive_personalized_federated_learning(
            lib.models.model_grad(lib.model),
            lib.optimizers.sgd(0.3),
            lib.optimizers.sgd(1.0),
            lib.train_hparams,
            client_coefficient=0.4,
        )

    ours, theirs = _both(build)
    _assert_same_history(ours, theirs, ["params", "opt_state"])
    for (_, _, our_clients), (_, _, their_clients) in zip(ours, theirs, strict=True):
        assert sorted(our_clients) == sorted(their_clients)
        for cid, our_client in our_clients.items():
            their_client = their_clients[cid]
            _assert_bitwise_equal(our_client.params, their_client.params, f"{cid} params")
            _assert_bitwise_equal(
                our_client.interpolation_coefficients,
                their_client.interpolation_coefficients,
                f"{cid} coefficients",
            )


def test_apfl_evaluation_matches_fedjax():
    results = []
    for name in ("ours", "theirs"):
        lib = _library(name)
        algorithm = lib.apfl.adaptive_personalized_federated_learning(
            lib.models.model_grad(lib.model),
            lib.optimizers.sgd(0.3),
            lib.optimizers.sgd(1.0),
            lib.train_hparams,
            client_coefficient=0.4,
        )
        state = _run(lib, algorithm, lib.model.init(jax.random.PRNGKey(0)), 1)[-1][0]
        evaluate = lib.apfl.eval_adaptive_personalized_federated_learning(
            lib.model, lib.padded_hparams
        )
        # After round 0 only c0 and c2 have personal states; c3 is evaluated with global params.
        clients = [(cid, lib.ClientDataset(EXAMPLES[cid])) for cid in (b"c0", b"c3", b"c2")]
        results.append(
            {
                cid: {k: s.result() for k, s in stats.items()}
                for cid, stats in evaluate(state, clients)
            }
        )
    ours, theirs = results
    assert list(ours) == list(theirs)
    for cid in ours:
        _assert_bitwise_equal(ours[cid], theirs[cid], f"eval {cid}")


def _cluster_init(lib):
    return lib.hyp_cluster.random_init(2, _init, jax.random.PRNGKey(5))


def test_hyp_cluster_matches_fedjax():
    def build(lib):
        return lib.hyp_cluster.hyp_cluster(
            lib.models.model_per_example_loss(lib.model),
            lib.optimizers.sgd(0.2),
            lib.optimizers.sgd(1.0, momentum=0.5),
            lib.padded_hparams,
            lib.train_hparams,
            regularizer=lambda params: 0.01 * jnp.sum(params["dense"]["w"] ** 2),
        )

    ours, theirs = _both(build, init_input=_cluster_init)
    _assert_same_history(ours, theirs, ["cluster_params", "opt_states"])
    assignments = {int(d["cluster_id"]) for _, diag, _ in ours for d in diag.values()}
    assert assignments == {0, 1}, "both clusters should get clients in this setup"


def test_hyp_cluster_kmeans_init_and_evaluator_match_fedjax():
    outputs = []
    for name in ("ours", "theirs"):
        lib = _library(name)
        initializer = lib.hyp_cluster.ModelKMeansInitializer(lib.model, lib.optimizers.sgd(0.5))
        clients = _round_clients(lib, 1)
        centers = initializer.cluster_params(
            num_clusters=2,
            rng=jax.random.PRNGKey(3),
            clients=clients,
            train_batch_hparams=lib.train_hparams,
            eval_batch_hparams=lib.padded_hparams,
        )
        evaluator = lib.hyp_cluster.HypClusterEvaluator(lib.model)
        test_clients = [(cid, lib.ClientDataset(EXAMPLES[cid])) for cid, _, _ in clients]
        evaluated = dict(
            evaluator.evaluate_clients(centers, clients, test_clients, lib.padded_hparams)
        )
        outputs.append((centers, evaluated))
    (our_centers, our_eval), (their_centers, their_eval) = outputs
    _assert_bitwise_equal(our_centers, their_centers, "kmeans centers")
    assert list(our_eval) == list(their_eval)
    for cid in our_eval:
        _assert_bitwise_equal(
            {k: our_eval[cid][k] for k in sorted(our_eval[cid])},
            {k: their_eval[cid][k] for k in sorted(their_eval[cid])},
            f"eval {cid}",
        )


@pytest.mark.parametrize(
    "module",
    ["fed_avg", "fed_prox", "mime", "mime_lite", "hyp_cluster", "agnostic_fed_avg", "apfl"],
)
def test_public_names_of_fedjax_algorithm_modules_exist(module):
    import importlib
    import inspect

    theirs = importlib.import_module(f"fedjax.algorithms.{module}")
    ours = importlib.import_module(f"fedjax_exp.algorithms.{module}")
    public = [
        name
        for name, value in vars(theirs).items()
        if not name.startswith("_")
        and (inspect.isfunction(value) or inspect.isclass(value))
        and value.__module__ == theirs.__name__
    ]
    public += [name for name in ("ServerState", "Grads") if hasattr(theirs, name)]
    assert public
    assert [name for name in public if not hasattr(ours, name)] == []
