"""training's evaluation functions on the embedded FEMNIST sample (no network): equal to
evaluate_model on the batches they should use and to FedJAX 0.0.17's evaluation functions;
a FedAvg experiment end to end (final .tsv, resume with optimizer state); get_task."""

from __future__ import annotations

import functools
import shutil

import jax
import numpy as np
import pytest

from fedjax_exp.algorithms import fed_avg
from fedjax_exp.core import client_datasets, client_samplers, federated_data, models, optimizers
from fedjax_exp.datasets import sample
from fedjax_exp.models import emnist as emnist_models
from fedjax_exp.training import (
    ALL_TASKS,
    FederatedExperimentConfig,
    ModelFullEvaluationFn,
    ModelSampleClientsEvaluationFn,
    ModelTrainClientsEvaluationFn,
    get_task,
    load_latest_checkpoint,
    read_metrics,
    run_federated_experiment,
)

HPARAMS = client_datasets.PaddedBatchHParams(batch_size=64, num_batch_size_buckets=2)


@functools.cache
def _data():
    return sample.load_data()


@functools.cache
def _model_and_params():
    model = emnist_models.create_logistic_model()
    return model, model.init(jax.random.PRNGKey(5))


class _State:
    """Any server state with a params field."""

    def __init__(self, params):
        self.params = params


def _assert_metrics_equal(got, want):
    # Same names; the order is the model's eval_metrics order here, sorted in FedJAX (jit).
    assert sorted(got) == sorted(want)
    for name in want:
        np.testing.assert_array_equal(np.asarray(got[name]), np.asarray(want[name]))


def test_full_evaluation_is_evaluate_model_on_all_batches():
    _, test = _data()
    model, params = _model_and_params()
    got = ModelFullEvaluationFn(test, model, HPARAMS)(_State(params), round_num=3)
    batches = list(federated_data.padded_batch_federated_data(test, HPARAMS))
    assert sum(int(b["__mask__"].sum()) for b in batches) == 669  # Every test example.
    _assert_metrics_equal(got, models.evaluate_model(model, params, batches))
    # The round does not matter.
    _assert_metrics_equal(ModelFullEvaluationFn(test, model, HPARAMS)(_State(params), 99), got)


def test_sample_clients_evaluation_uses_the_samplers_clients_of_the_round():
    _, test = _data()
    model, params = _model_and_params()
    fn = ModelSampleClientsEvaluationFn(
        client_samplers.UniformGetClientSampler(test, 4, seed=1), model, HPARAMS
    )
    reference = client_samplers.UniformGetClientSampler(test, 4, seed=1)
    results = {}
    for round_num in (7, 2, 7):
        reference.set_round_num(round_num)
        datasets = [dataset for _, dataset, _ in reference.sample()]
        batches = client_datasets.padded_batch_client_datasets(datasets, HPARAMS)
        want = models.evaluate_model(model, params, batches)
        results[round_num] = fn(_State(params), round_num)
        _assert_metrics_equal(results[round_num], want)
    assert float(results[7]["loss"]) != float(results[2]["loss"])


def test_train_clients_evaluation_uses_the_given_clients():
    train, _ = _data()
    model, params = _model_and_params()
    sampler = client_samplers.UniformGetClientSampler(train, 3, seed=0)
    sampler.set_round_num(4)
    clients = sampler.sample()
    got = ModelTrainClientsEvaluationFn(model, HPARAMS)(_State(params), 4, clients)
    batches = client_datasets.padded_batch_client_datasets([c[1] for c in clients], HPARAMS)
    _assert_metrics_equal(got, models.evaluate_model(model, params, batches))


def test_evaluation_functions_match_fedjax(fedjax_on_current_jax):
    fedjax = pytest.importorskip("fedjax")
    from fedjax.training import federated_experiment as theirs

    train, test = _data()
    model, params = _model_and_params()
    their_model = fedjax.models.emnist.create_logistic_model()
    their_train, their_test = (
        fedjax.InMemoryFederatedData({cid: ds.all_examples() for cid, ds in fd.clients()})
        for fd in (train, test)
    )
    their_hparams = fedjax.PaddedBatchHParams(batch_size=64, num_batch_size_buckets=2)
    state = _State(params)

    got = ModelFullEvaluationFn(test, model, HPARAMS)(state, 1)
    want = theirs.ModelFullEvaluationFn(their_test, their_model, their_hparams)(state, 1)
    _assert_metrics_equal(got, want)

    got = ModelSampleClientsEvaluationFn(
        client_samplers.UniformGetClientSampler(test, 5, seed=3), model, HPARAMS
    )(state, 6)
    want = theirs.ModelSampleClientsEvaluationFn(
        fedjax.client_samplers.UniformGetClientSampler(their_test, 5, seed=3),
        their_model,
        their_hparams,
    )(state, 6)
    _assert_metrics_equal(got, want)

    sampler = client_samplers.UniformGetClientSampler(train, 3, seed=0)
    their_sampler = fedjax.client_samplers.UniformGetClientSampler(their_train, 3, seed=0)
    got = ModelTrainClientsEvaluationFn(model, HPARAMS)(state, 2, sampler.sample())
    want = theirs.ModelTrainClientsEvaluationFn(their_model, their_hparams)(
        state, 2, their_sampler.sample()
    )
    _assert_metrics_equal(got, want)


# ---- FedAvg end to end ----------------------------------------------------------------------


def _fed_avg_experiment(root, num_rounds, **config_kwargs):
    train, test = _data()
    model, params = _model_and_params()
    algorithm = fed_avg.federated_averaging(
        models.model_grad(model),
        optimizers.sgd(0.1),
        optimizers.adam(0.01),
        client_datasets.ShuffleRepeatBatchHParams(batch_size=20, num_epochs=1, seed=0),
    )
    test_sampler = client_samplers.UniformGetClientSampler(test, 4, seed=9)
    state = run_federated_experiment(
        algorithm,
        algorithm.init(params),
        client_samplers.UniformGetClientSampler(train, 3, seed=0),
        FederatedExperimentConfig(str(root), num_rounds, **config_kwargs),
        periodic_eval_fn_map={
            "test": ModelSampleClientsEvaluationFn(test_sampler, model, HPARAMS),
            "train": ModelTrainClientsEvaluationFn(model, HPARAMS),
        },
        final_eval_fn_map={"full_test": ModelFullEvaluationFn(test, model, HPARAMS)},
    )
    return state, model, test


def test_fed_avg_experiment_evaluates_and_resumes(tmp_path):
    whole, model, test = _fed_avg_experiment(tmp_path / "whole", 4, eval_frequency=2)
    final = models.evaluate_model(
        model, whole.params, federated_data.padded_batch_federated_data(test, HPARAMS)
    )
    header, values = (tmp_path / "whole" / "full_test.tsv").read_text().split("\n")
    assert header.split("\t") == list(final)
    assert values.split("\t") == [str(v) for v in final.values()]
    metrics = read_metrics(tmp_path / "whole")
    assert sorted(metrics[("test", "accuracy")]) == [1, 2, 4]
    assert sorted(metrics[("train", "loss")]) == [1, 2, 4]

    # Two rounds, stop, then the same experiment to round 4: the same server state (params and
    # Adam's moments), restored from the checkpoint of round 2.
    _fed_avg_experiment(tmp_path / "resumed", 2, checkpoint_frequency=1)
    assert load_latest_checkpoint(tmp_path / "resumed")[1] == 2
    resumed, _, _ = _fed_avg_experiment(tmp_path / "resumed", 4, checkpoint_frequency=1)
    assert type(resumed) is fed_avg.ServerState
    leaves = jax.tree_util.tree_leaves(resumed), jax.tree_util.tree_leaves(whole)
    for a, b in zip(*leaves, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ---- get_task -------------------------------------------------------------------------------


@pytest.fixture()
def sample_cache(tmp_path):
    """The embedded sample's files under the names of TFF's EMNIST h5 files."""
    for split, path in sample.paths().items():
        shutil.copy(path, tmp_path / f"fed_emnist_{split}.h5")
    return tmp_path


def test_get_task_loads_the_emnist_splits(sample_cache):
    train, test, _ = get_task("EMNIST_LOGISTIC", mode="h5", cache_dir=sample_cache)
    for got, want in zip((train, test), sample.load_data(), strict=True):
        assert list(got.client_ids()) == list(want.client_ids())
        cid = list(want.client_ids())[-1]
        got_examples = got.get_client(cid).all_examples()
        want_examples = want.get_client(cid).all_examples()
        assert sorted(got_examples) == sorted(want_examples) == ["domain_id", "x", "y"]
        for k in want_examples:
            np.testing.assert_array_equal(got_examples[k], want_examples[k])


@pytest.mark.parametrize(
    ("name", "create"),
    [
        ("EMNIST_CONV", emnist_models.create_conv_model),
        ("EMNIST_LOGISTIC", emnist_models.create_logistic_model),
        ("EMNIST_DENSE", emnist_models.create_dense_model),
    ],
)
def test_get_task_models(sample_cache, name, create):
    assert name in ALL_TASKS
    _, _, model = get_task(name, mode="h5", cache_dir=sample_cache)
    key = jax.random.PRNGKey(0)
    # Shapes only (traced, not run): the task's model is create(only_digits=False)'s.
    params = jax.eval_shape(model.init, key)
    assert params == jax.eval_shape(create(only_digits=False).init, key)
    batch = {"x": jax.ShapeDtypeStruct((2, 28, 28, 1), np.float32)}
    assert jax.eval_shape(model.apply_for_eval, params, batch).shape == (2, 62)


def test_get_task_unknown_or_unavailable(tmp_path):
    assert ALL_TASKS == ("EMNIST_CONV", "EMNIST_LOGISTIC", "EMNIST_DENSE")
    with pytest.raises(ValueError, match="'SHAKESPEARE_CHARACTER' is one of FedJAX's"):
        get_task("SHAKESPEARE_CHARACTER")
    with pytest.raises(ValueError, match="Unsupported task: 'MNIST'; available tasks: EMNIST"):
        get_task("MNIST")
    with pytest.raises(FileNotFoundError, match="fed_emnist_train.h5"):
        get_task("EMNIST_LOGISTIC", mode="h5", cache_dir=tmp_path)
