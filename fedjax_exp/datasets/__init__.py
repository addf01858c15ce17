"""Dataset loaders (``fedjax.datasets``).

- :mod:`.emnist`: federated EMNIST from FedJAX's SQLite cache or TFF's h5 files (downloaded
  with checksums and atomic writes when missing);
- :mod:`.sample`: a small real FEMNIST sample shipped with the package (no network);
- :mod:`.files`: any TFF h5 / FedJAX SQLite file (``load_federated_file``);
- :mod:`.synthetic` and :mod:`.partition`: generated data and centralized-to-federated splits;
- :mod:`.tff_h5` and :mod:`.downloads`: the file format and download machinery.
"""

from fedjax_exp.datasets import (
    downloads,
    emnist,
    files,
    partition,
    sample,
    synthetic,
    tff_h5,
)
from fedjax_exp.datasets.files import load_federated_file, load_federated_files

__all__ = [
    "downloads",
    "emnist",
    "files",
    "load_federated_file",
    "load_federated_files",
    "partition",
    "sample",
    "synthetic",
    "tff_h5",
]
