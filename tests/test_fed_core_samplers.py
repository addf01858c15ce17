"""Client samplers: the same clients and client keys as FedJAX 0.0.17 for the same seed."""

from __future__ import annotations

import fedjax
import jax
import numpy as np
import pytest

import fedjax_exp
from fedjax_exp.core import client_samplers

pytestmark = pytest.mark.usefixtures("fedjax_on_current_jax")


def _client_examples(num_clients: int) -> dict[bytes, dict[str, np.ndarray]]:
    rng = np.random.RandomState(0)
    # One id ends in a zero byte: sampling must keep it intact (NumPy bytes arrays strip it).
    ids = [f"{i:04d}".encode() for i in range(num_clients - 1)] + [b"zz\x00"]
    return {cid: {"x": rng.normal(size=(1 + i % 5, 3))} for i, cid in enumerate(ids)}


def _pair(num_clients: int = 23):
    examples = _client_examples(num_clients)
    return (
        fedjax_exp.InMemoryFederatedData(examples),
        fedjax.InMemoryFederatedData(examples),
    )


def _summary(sampled):
    return [(cid, len(ds), np.asarray(rng).tolist()) for cid, ds, rng in sampled]


@pytest.mark.parametrize("seed", [0, 7])
def test_uniform_get_sampler_matches_fedjax_rounds(seed):
    ours_fd, theirs_fd = _pair()
    ours = client_samplers.UniformGetClientSampler(ours_fd, num_clients=5, seed=seed)
    theirs = fedjax.client_samplers.UniformGetClientSampler(theirs_fd, num_clients=5, seed=seed)
    for _ in range(6):
        assert _summary(ours.sample()) == _summary(theirs.sample())
    # Jumping to a round reproduces it, as in FedJAX.
    ours.set_round_num(3)
    theirs.set_round_num(3)
    assert _summary(ours.sample()) == _summary(theirs.sample())


def test_uniform_get_sampler_start_round_and_all_clients():
    ours_fd, theirs_fd = _pair()
    ours = client_samplers.UniformGetClientSampler(ours_fd, 23, seed=1, start_round_num=4)
    theirs = fedjax.client_samplers.UniformGetClientSampler(
        theirs_fd, 23, seed=1, start_round_num=4
    )
    sampled = ours.sample()
    assert _summary(sampled) == _summary(theirs.sample())
    assert sorted(cid for cid, _, _ in sampled) == sorted(ours_fd.client_ids())
    # Client keys are split from PRNGKey(round_num).
    np.testing.assert_array_equal(
        np.stack([rng for _, _, rng in sampled]),
        jax.random.split(jax.random.PRNGKey(4), 23),
    )


def test_uniform_shuffled_sampler_matches_fedjax_with_restart():
    ours_fd, theirs_fd = _pair()
    ours = client_samplers.UniformShuffledClientSampler(ours_fd.shuffled_clients(8, seed=3), 4)
    theirs = fedjax.client_samplers.UniformShuffledClientSampler(
        theirs_fd.shuffled_clients(8, seed=3), 4
    )
    for _ in range(8):  # 32 clients: crosses the pass over all 23.
        assert _summary(ours.sample()) == _summary(theirs.sample())
    restarted = client_samplers.UniformShuffledClientSampler(
        ours_fd.shuffled_clients(8, seed=3), 4, start_round_num=5
    )
    reference = fedjax.client_samplers.UniformShuffledClientSampler(
        theirs_fd.shuffled_clients(8, seed=3), 4, start_round_num=5
    )
    assert _summary(restarted.sample()) == _summary(reference.sample())


def test_pseudo_random_state_matches_fedjax():
    for seed, round_num in [(0, 0), (1, 5), (123, 10_000)]:
        ours = client_samplers.get_pseudo_random_state(seed, round_num)
        theirs = fedjax.client_samplers.get_pseudo_random_state(seed, round_num)
        np.testing.assert_array_equal(ours.randint(0, 1000, 10), theirs.randint(0, 1000, 10))


def test_get_sampler_rejects_more_clients_than_exist():
    ours_fd, _ = _pair(5)
    with pytest.raises(ValueError, match="asked for 6 clients per round .* has only 5"):
        client_samplers.UniformGetClientSampler(ours_fd, num_clients=6, seed=0)


def test_shuffled_sampler_reports_an_exhausted_stream():
    ours_fd, _ = _pair(5)
    sampler = client_samplers.UniformShuffledClientSampler(iter(ours_fd.clients()), 3)
    sampler.sample()
    with pytest.raises(ValueError, match="client stream ran out"):
        sampler.sample()


def test_shuffled_sampler_cannot_jump_rounds():
    ours_fd, _ = _pair(5)
    sampler = client_samplers.UniformShuffledClientSampler(ours_fd.shuffled_clients(2), 2)
    with pytest.raises(NotImplementedError, match="UniformGetClientSampler"):
        sampler.set_round_num(3)
