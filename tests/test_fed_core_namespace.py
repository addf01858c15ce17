"""``import fedjax_exp as fedjax``: FedJAX 0.0.17's public names, top level and federated core."""

from __future__ import annotations

import importlib
import types

import fedjax
import pytest

import fedjax_exp

pytestmark = pytest.mark.usefixtures("fedjax_on_current_jax")


def _public(module: types.ModuleType) -> set[str]:
    return {name for name in dir(module) if not name.startswith("_")}


def test_every_fedjax_top_level_name_resolves():
    missing = sorted(_public(fedjax) - set(dir(fedjax_exp)))
    assert missing == []
    for name in sorted(_public(fedjax)):
        value = getattr(fedjax_exp, name)
        # Submodules stay submodules; classes and functions keep their kind.
        assert isinstance(value, types.ModuleType) == isinstance(
            getattr(fedjax, name), types.ModuleType
        ), name


def test_federated_top_level_names_are_the_core_ones():
    from fedjax_exp.core import client_samplers, federated_algorithm, for_each_client

    assert fedjax_exp.FederatedAlgorithm is federated_algorithm.FederatedAlgorithm
    assert fedjax_exp.for_each_client is for_each_client.for_each_client
    assert fedjax_exp.ForEachClientBackend is for_each_client.ForEachClientBackend
    assert fedjax_exp.client_samplers is client_samplers


# Names of FedJAX's pmap backend internals, with no counterpart in the sharded backend.
NOT_PORTED = {"for_each_client": {"BackendChoice", "ClientBlock"}}


@pytest.mark.parametrize(
    "module",
    [
        "for_each_client",
        "federated_algorithm",
        "client_samplers",
        "serialization",
        "tree_util",
        "util",
    ],
)
def test_federated_core_modules_have_fedjax_public_names(module):
    theirs = importlib.import_module(f"fedjax.core.{module}")
    ours = importlib.import_module(f"fedjax_exp.core.{module}")
    defined_there = {
        name
        for name in _public(theirs)
        if getattr(getattr(theirs, name), "__module__", None) == theirs.__name__
    }
    missing = defined_there - set(dir(ours)) - NOT_PORTED.get(module, set())
    assert sorted(missing) == []
    for name in defined_there - NOT_PORTED.get(module, set()):
        getattr(ours, name)


def test_pmap_backend_name_is_the_sharded_backend():
    from fedjax_exp.core import for_each_client, parallel_for_each_client

    assert (
        for_each_client.ForEachClientPmapBackend
        is parallel_for_each_client.ForEachClientShardedBackend
    )
