"""Running the same per-client computation over many clients (``fedjax.for_each_client``).

A federated round trains every sampled client from the same starting point: ``client_init``
builds a client's state from the shared input (e.g. the server parameters) and its own input
(e.g. its rng key), ``client_step`` folds in one batch, ``client_final`` turns the last state
into the client's output (e.g. the parameter delta). How those calls are executed is a
pluggable *backend*:

- ``'jit'`` (default): each function jitted, clients and batches looped over in Python.
- ``'debug'``: no jit; errors are wrapped with the offending client, stage and inputs.
- ``'parallel'``: the clients of a call trained together in one compiled program
  (vmap over blocks of clients, scan over padded steps); see ``parallel_for_each_client``.
- ``'sharded'`` (alias ``'pmap'``): the same program with the clients axis sharded over the
  local devices with ``jax.sharding``; it replaces FedJAX's pmap backend.

Every backend yields ``(client_id, client_output, step_results)`` in the order the clients
were given, and rejects a client without any batch (its output would be the untrained start,
silently weighted zero or dividing by zero downstream).
"""

from __future__ import annotations

import abc
import contextlib
import functools
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import jax
import jax.numpy as jnp

from fedjax_exp.core.typing import BatchExample, PyTree

__all__ = [
    "ClientFinal",
    "ClientInit",
    "ClientStep",
    "ForEachClient",
    "ForEachClientBackend",
    "ForEachClientDebugBackend",
    "ForEachClientError",
    "ForEachClientJitBackend",
    "for_each_client",
    "for_each_client_backend",
    "get_for_each_client_backend",
    "set_for_each_client_backend",
]

# Input common to all clients of a call (e.g. the server's model parameters).
SharedInput = PyTree
# Input of one client (e.g. its PRNG key, or per-client state in cross-silo algorithms).
ClientInput = PyTree
# State threaded through a client's steps (e.g. parameters and optimizer state).
ClientStepState = PyTree
# Whatever a step reports (e.g. the gradient norm); collected per step when asked for.
ClientStepResult = PyTree
# A client's final result (e.g. its parameter delta).
ClientOutput = PyTree
# Any hashable value identifies a client here (FedJAX uses bytes).
ClientId = Any

ClientInit = Callable[[SharedInput, ClientInput], ClientStepState]
ClientStep = Callable[[ClientStepState, BatchExample], tuple[ClientStepState, ClientStepResult]]
ClientFinal = Callable[[SharedInput, ClientStepState], ClientOutput]
ForEachClient = Callable[
    [SharedInput, Iterable[tuple[ClientId, Iterable[BatchExample], ClientInput]]],
    Iterator[tuple[ClientId, ClientOutput, list[ClientStepResult]]],
]


def empty_client_error(client_id: ClientId) -> ValueError:
    """The error every backend raises for a client that has no batch at all."""
    return ValueError(
        f"for_each_client: client {client_id!r} has no batches (zero examples), so it would "
        "return its untrained starting state. Leave clients without examples out of the round "
        "(e.g. keep only clients with len(client_dataset) > 0)."
    )


class ForEachClientBackend(abc.ABC):
    """Turns ``(client_init, client_step, client_final)`` into a for-each-client function.

    ``client_step`` here always returns ``(state, step_result)``; the returned function maps
    ``(shared_input, clients)`` to an iterator of ``(client_id, output, step_results)``.
    """

    @abc.abstractmethod
    def __call__(
        self, client_init: ClientInit, client_step: ClientStep, client_final: ClientFinal
    ) -> ForEachClient:
        """Builds the for-each-client function."""


def _copy_tree(tree: PyTree) -> PyTree:
    # jit forwards inputs returned unchanged as the very same buffers; a copy makes the
    # initial state the step's own, so the step may donate (overwrite) it.
    return jax.tree_util.tree_map(jnp.copy, tree)


class ForEachClientJitBackend(ForEachClientBackend):
    """Sequential reference backend: jitted init/step/final, Python loops over clients/batches.

    One compilation per distinct batch shape; the step donates its state so parameters are
    updated in place.
    """

    def __call__(
        self, client_init: ClientInit, client_step: ClientStep, client_final: ClientFinal
    ) -> ForEachClient:
        init = jax.jit(lambda shared, client_input: _copy_tree(client_init(shared, client_input)))
        step = jax.jit(client_step, donate_argnums=0)
        final = jax.jit(client_final, donate_argnums=1)

        def run(shared_input, clients):
            for client_id, client_batches, client_input in clients:
                state = init(shared_input, client_input)
                step_results = []
                for batch in client_batches:
                    state, step_result = step(state, batch)
                    step_results.append(step_result)
                if not step_results:
                    raise empty_client_error(client_id)
                with warnings.catch_warnings():
                    # The final state is donated; parts client_final drops (e.g. a step count)
                    # cannot be reused for its output, which is expected, not worth a warning.
                    warnings.filterwarnings("ignore", "Some donated buffers were not usable")
                    output = final(shared_input, state)
                yield client_id, output, step_results

        return run


class ForEachClientError(Exception):
    """An exception raised inside client_init/step/final, with what it was called with.

    Attributes:
        base: The original exception.
        stage: ``'client_init'``, ``'client_step'`` or ``'client_final'``.
        context: The client id, the function and its arguments at the failure.
    """

    def __init__(self, base: Exception, stage: str, **context: Any):
        super().__init__()
        self.base = base
        self.stage = stage
        self.context = context

    def __str__(self) -> str:
        return (
            f"Stage: {self.stage}. Base error is {type(self.base).__name__}: {self.base}.\n"
            "See the `context` field of this exception for the inputs of the failing call."
        )


class ForEachClientDebugBackend(ForEachClientBackend):
    """Slow backend for debugging: jit disabled, failures wrapped in ``ForEachClientError``."""

    def __call__(
        self, client_init: ClientInit, client_step: ClientStep, client_final: ClientFinal
    ) -> ForEachClient:
        def call(stage: str, fn: Callable, client_id: ClientId, **kwargs: Any) -> Any:
            try:
                return fn(*kwargs.values())
            except Exception as e:
                raise ForEachClientError(
                    e, stage=stage, client_id=client_id, **{stage: fn}, **kwargs
                ) from e

        def run(shared_input, clients):
            with jax.disable_jit():
                for client_id, client_batches, client_input in clients:
                    state = call(
                        "client_init",
                        client_init,
                        client_id,
                        shared_input=shared_input,
                        client_input=client_input,
                    )
                    step_results = []
                    for batch in client_batches:
                        state, step_result = call(
                            "client_step", client_step, client_id, state=state, batch=batch
                        )
                        step_results.append(step_result)
                    if not step_results:
                        raise empty_client_error(client_id)
                    output = call(
                        "client_final",
                        client_final,
                        client_id,
                        shared_input=shared_input,
                        state=state,
                    )
                    yield client_id, output, step_results

        return run


# Defined in parallel_for_each_client (which imports this module), re-exported lazily here so
# FedJAX code naming fedjax.core.for_each_client.ForEachClientPmapBackend keeps working.
_PARALLEL_NAMES = {
    "ForEachClientParallelBackend": "ForEachClientParallelBackend",
    "ForEachClientShardedBackend": "ForEachClientShardedBackend",
    "ForEachClientPmapBackend": "ForEachClientShardedBackend",
}


def __getattr__(name: str) -> Any:
    if name in _PARALLEL_NAMES:
        from fedjax_exp.core import parallel_for_each_client

        return getattr(parallel_for_each_client, _PARALLEL_NAMES[name])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_PARALLEL_NAMES])


def _backend_by_name(name: str) -> ForEachClientBackend:
    if name == "jit":
        return ForEachClientJitBackend()
    if name == "debug":
        return ForEachClientDebugBackend()
    # Imported here: the parallel module builds on this one.
    from fedjax_exp.core import parallel_for_each_client

    if name == "parallel":
        return parallel_for_each_client.ForEachClientParallelBackend()
    if name in ("sharded", "pmap"):
        return parallel_for_each_client.ForEachClientShardedBackend()
    raise ValueError(
        f"Unsupported for_each_client backend {name!r}: use 'jit', 'debug', 'parallel', "
        "'sharded' (or its alias 'pmap'), None for the default, or a ForEachClientBackend."
    )


class _BackendChoice(threading.local):
    """The backend chosen for the current thread (None means the default)."""

    def __init__(self):
        super().__init__()
        self.backend: ForEachClientBackend | None = None


_DEFAULT_BACKEND = ForEachClientJitBackend()
_BACKEND_CHOICE = _BackendChoice()


def get_for_each_client_backend() -> ForEachClientBackend:
    """The backend ``for_each_client`` uses in the current thread."""
    return _BACKEND_CHOICE.backend or _DEFAULT_BACKEND


def set_for_each_client_backend(backend: ForEachClientBackend | str | None) -> None:
    """Chooses the for_each_client backend for the current thread.

    Args:
        backend: None (the default, ``'jit'``), one of ``'jit'``, ``'debug'``, ``'parallel'``,
            ``'sharded'``/``'pmap'``, or a ``ForEachClientBackend`` instance.
    """
    if backend is None or isinstance(backend, ForEachClientBackend):
        _BACKEND_CHOICE.backend = backend
    elif isinstance(backend, str):
        _BACKEND_CHOICE.backend = _backend_by_name(backend)
    else:
        raise TypeError(
            f"set_for_each_client_backend expects a name, a ForEachClientBackend or None, "
            f"got {type(backend).__name__}."
        )


@contextlib.contextmanager
def for_each_client_backend(backend: ForEachClientBackend | str | None) -> Iterator[None]:
    """Uses ``backend`` (see ``set_for_each_client_backend``) inside a ``with`` block."""
    previous = _BACKEND_CHOICE.backend
    try:
        set_for_each_client_backend(backend)
        yield
    finally:
        _BACKEND_CHOICE.backend = previous


def _identity_final(shared_input: SharedInput, state: ClientStepState) -> ClientOutput:
    del shared_input
    return state


def cached_by_functions(build: Callable) -> Callable:
    """Caches ``build(*functions)`` by the functions' identity/hash (unhashable: uncached).

    Wrappers and programs built from the same user functions are then the same objects, so
    jit's compilation cache (keyed by function) is hit when for_each_client is rebuilt.
    """
    cached = functools.lru_cache(maxsize=64)(build)

    def get(*args: Any) -> Any:
        try:
            hash(args)
        except TypeError:  # e.g. a callable dataclass holding arrays.
            return build(*args)
        return cached(*args)

    return get


@cached_by_functions
def _without_step_result(client_step: Callable) -> ClientStep:
    def step(state, batch):
        return client_step(state, batch), ()

    return step


def for_each_client(
    client_init: ClientInit,
    client_step: ClientStep | Callable[[ClientStepState, BatchExample], ClientStepState],
    client_final: ClientFinal = _identity_final,
    with_step_result: bool = False,
) -> Callable[..., Iterator[tuple]]:
    """Builds a function that runs init, steps and final for every client.

    The returned function takes ``(shared_input, clients)``, where ``clients`` is an iterable
    of ``(client_id, client_batches, client_input)``, and yields ``(client_id, output)`` per
    client (``(client_id, output, step_results)`` with ``with_step_result=True``), in order.

    For each client: ``state = client_init(shared_input, client_input)``, then for each batch
    ``state = client_step(state, batch)`` (or ``state, result = client_step(state, batch)``
    with ``with_step_result=True``), and finally ``output = client_final(shared_input,
    state)``. The backend in effect when this is called (see ``for_each_client_backend``)
    decides how: one client at a time, or all of them in one compiled program.

    Args:
        client_init: Builds a client's step state from the shared and the client's input.
        client_step: Updates the step state with one batch (a dict of arrays).
        client_final: Turns the last step state into the client's output; identity default.
        with_step_result: Whether ``client_step`` returns ``(state, step_result)``.

    Returns:
        The for-each-client function.
    """
    backend = get_for_each_client_backend()
    if with_step_result:
        return backend(client_init, client_step, client_final)
    run_with_results = backend(client_init, _without_step_result(client_step), client_final)

    def run(shared_input, clients):
        for client_id, output, _ in run_with_results(shared_input, clients):
            yield client_id, output

    return run
