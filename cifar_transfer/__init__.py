"""cifar_transfer: transfer learning on labelled images as plain, Prefect-free functions.

Stages (one module each; see docs/architecture.md): `download` -> `dataset` (decode) -> `engines` + `extract`
(one shard, written by `shard_files`) -> `commit` (manifests) -> `tsne`, `head` -> `report`; `store` and
`catalogue` are the reading API. `layout` owns every path under a storage root, `config` the one typed
configuration and its fingerprints, `records` the stored records' format versions.
The Prefect layer lives in `cifar_transfer.tasks` and `cifar_transfer.flows`; importing this package, or reading
features, imports neither Prefect nor TensorFlow:

    from cifar_transfer import load_features, list_feature_sets
    index, labels, features = load_features("storage", "train")
"""

from __future__ import annotations

import os
import sys

# No telemetry unless the user opts in. OpenVINO's model converter sends usage data from a forked process on every
# conversion (off only where CI=true), and offline its name lookup can hold a finished command for minutes; with its
# telemetry package unimportable, the converter uses its own no-op stub. Prefect's is off too (flows/console.py).
if os.environ.get("CIFAR_TRANSFER_OPENVINO_TELEMETRY") != "1":
    sys.modules.setdefault("openvino_telemetry", None)  # type: ignore[arg-type]

# The reading API, by the module that holds each name: imported on first use (so `import cifar_transfer` stays cheap).
_READING_API = {"find_feature_set": "catalogue", "list_feature_sets": "catalogue", "load_features": "store"}
__all__ = sorted(_READING_API)


def __getattr__(name: str):
    if name in _READING_API:
        from importlib import import_module

        return getattr(import_module(f"cifar_transfer.{_READING_API[name]}"), name)
    raise AttributeError(f"module 'cifar_transfer' has no attribute {name!r}")
