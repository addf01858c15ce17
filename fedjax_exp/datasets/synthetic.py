"""Synthetic federated classification data: any number of clients, sizes and label skew.

Each class ``c`` has a fixed random prototype image; an example is its class prototype plus
Gaussian noise, so models can learn it and accuracy is meaningful. Client sizes are lognormal;
each client's label distribution is drawn from Dirichlet(``label_alpha``) (small alpha: few
classes per client; ``None``: uniform labels). Everything is determined by ``seed``.

Domains stand in for EMNIST's writer populations (NIST high-school students vs Census staff):
client ``i`` belongs to domain ``i % num_domains``, and every example carries its client's
domain under ``domain_id``, so per-domain metrics (``metrics=full``) work on synthetic data.
With ``domain_shift > 0`` each domain also has its own "writing style": a fixed random offset
added to all of its examples, so the domains differ in difficulty as real populations do.

Features: ``x`` float32 (N, *x_shape) (EMNIST-shaped (28, 28, 1) by default), ``y`` int32 and
``domain_id`` int32 in ``[0, num_domains)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedjax_exp.core.in_memory_federated_data import InMemoryFederatedData
from fedjax_exp.datasets.partition import client_ids_for

__all__ = ["client_sizes", "load_data", "make_federated_data"]


def client_sizes(
    num_clients: int, mean_size: float, sigma: float, rng: np.random.Generator, min_size: int = 1
) -> np.ndarray:
    """Lognormal client sizes with mean about ``mean_size`` (``sigma`` = log-space spread),
    each at least ``min_size``."""
    mu = np.log(mean_size) - sigma**2 / 2  # E[lognormal(mu, sigma)] = mean_size
    sizes = np.rint(rng.lognormal(mu, sigma, size=num_clients)).astype(np.int64)
    return np.maximum(sizes, min_size)


def make_federated_data(
    num_clients: int = 100,
    mean_client_size: float = 50.0,
    size_sigma: float = 0.5,
    num_classes: int = 10,
    label_alpha: float | None = 0.5,
    x_shape: Sequence[int] = (28, 28, 1),
    noise: float = 0.5,
    seed: int = 0,
    min_client_size: int = 1,
    num_domains: int = 2,
    domain_shift: float = 0.0,
) -> InMemoryFederatedData:
    """A synthetic federated dataset (see the module docstring).

    Args:
      num_clients: number of clients (ids ``b'client_00000'``, ...).
      mean_client_size: mean examples per client.
      size_sigma: lognormal spread of client sizes (0: all clients the same size).
      num_classes: labels are ``0 .. num_classes-1``.
      label_alpha: Dirichlet concentration of each client's label distribution; None for
        uniform labels (IID).
      x_shape: per-example shape of ``x``.
      noise: standard deviation of the Gaussian noise around the class prototype.
      seed: fixes everything.
      min_client_size: smallest client size.
      num_domains: client ``i`` is in domain ``i % num_domains`` (feature ``domain_id``); 2 by
        default, like EMNIST's two NIST writer populations.
      domain_shift: standard deviation of each domain's fixed offset added to ``x`` (0: the
        domains differ only in their ids). Drawn from a separate stream, so ``x`` for
        ``domain_shift=0`` does not depend on ``num_domains``.
    """
    checks = (("num_clients", num_clients), ("num_classes", num_classes))
    for name, value in (*checks, ("num_domains", num_domains)):
        if not isinstance(value, (int, np.integer)) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not mean_client_size >= 1:
        raise ValueError(f"mean_client_size must be at least 1, got {mean_client_size!r}")
    if size_sigma < 0:
        raise ValueError(f"size_sigma must be >= 0, got {size_sigma!r}")
    if label_alpha is not None and not label_alpha > 0:
        raise ValueError(f"label_alpha must be positive or None, got {label_alpha!r}")
    if noise < 0:
        raise ValueError(f"noise must be >= 0, got {noise!r}")
    if not domain_shift >= 0:
        raise ValueError(f"domain_shift must be >= 0, got {domain_shift!r}")
    x_shape = tuple(int(d) for d in x_shape)

    rng = np.random.default_rng(seed)
    prototypes = rng.uniform(0.0, 1.0, size=(num_classes, *x_shape)).astype(np.float32)
    sizes = client_sizes(num_clients, mean_client_size, size_sigma, rng, min_client_size)
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    total = int(offsets[-1])

    if label_alpha is None:
        y = rng.integers(0, num_classes, size=total)
    else:
        y = np.empty(total, dtype=np.int64)
        mix = rng.dirichlet(np.full(num_classes, float(label_alpha)), size=num_clients)
        for i in range(num_clients):
            y[offsets[i] : offsets[i + 1]] = rng.choice(num_classes, size=sizes[i], p=mix[i])
    y = y.astype(np.int32)
    x = prototypes[y]
    x += rng.normal(0.0, noise, size=x.shape).astype(np.float32)
    domain_id = np.repeat(np.arange(num_clients) % num_domains, sizes).astype(np.int32)
    if domain_shift > 0:
        # A child stream: adding domains leaves every draw above (and so x) unchanged.
        style_rng = np.random.default_rng([seed, 1])
        styles = style_rng.normal(0.0, domain_shift, size=(num_domains, *x_shape))
        x += styles.astype(np.float32)[domain_id]
    return InMemoryFederatedData.from_columns(
        client_ids_for(num_clients), offsets, {"x": x, "y": y, "domain_id": domain_id}
    )


def load_data(
    num_clients: int = 100,
    mean_client_size: float = 60.0,
    test_fraction: float = 0.2,
    num_classes: int = 62,
    label_alpha: float | None = 0.5,
    x_shape: Sequence[int] = (28, 28, 1),
    noise: float = 0.5,
    size_sigma: float = 0.5,
    seed: int = 0,
    num_domains: int = 2,
    domain_shift: float = 0.0,
) -> tuple[InMemoryFederatedData, InMemoryFederatedData]:
    """(train, test) synthetic splits over the same clients, like a federated EMNIST stand-in.

    Each client's examples (drawn from its own label distribution) are split: the last
    ``max(1, round(test_fraction * n))`` go to test, the rest (at least one) to train. Features
    ``x`` float32 (N, *x_shape), ``y`` int32 and ``domain_id`` int32 (the client's domain, see
    :func:`make_federated_data`); 62 classes and 2 domains by default, as EMNIST.
    """
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must lie strictly between 0 and 1, got {test_fraction!r}")
    full = make_federated_data(
        num_clients=num_clients,
        mean_client_size=mean_client_size,
        size_sigma=size_sigma,
        num_classes=num_classes,
        label_alpha=label_alpha,
        x_shape=x_shape,
        noise=noise,
        seed=seed,
        min_client_size=2,
        num_domains=num_domains,
        domain_shift=domain_shift,
    )
    ids = list(full.client_ids())
    offsets = full.offsets
    sizes = np.diff(offsets)
    test_sizes = np.clip(np.rint(sizes * test_fraction).astype(np.int64), 1, sizes - 1)
    is_test = np.zeros(int(offsets[-1]), dtype=bool)
    # Mark the last test_sizes[i] rows of every client: rows at or past its cut point.
    cut = np.repeat(offsets[1:] - test_sizes, sizes)
    is_test[np.arange(int(offsets[-1])) >= cut] = True
    splits = []
    for mask, split_sizes in ((~is_test, sizes - test_sizes), (is_test, test_sizes)):
        split_offsets = np.concatenate([[0], np.cumsum(split_sizes)]).astype(np.int64)
        columns = {name: col[mask] for name, col in full.columns.items()}
        splits.append(InMemoryFederatedData.from_columns(ids, split_offsets, columns))
    return splits[0], splits[1]
