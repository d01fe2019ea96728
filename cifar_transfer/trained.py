"""A finished run's head, found on storage: what predicting with it or exporting it starts from."""

from __future__ import annotations

import posixpath

from pydantic import BaseModel

from cifar_transfer import layout
from cifar_transfer.catalogue import list_feature_sets
from cifar_transfer.errors import FeatureSetError
from cifar_transfer.feature_records import FeatureSetInfo
from cifar_transfer.head import HeadMetrics, finished_head
from cifar_transfer.layout import HeadFiles
from cifar_transfer.redact import redact
from cifar_transfer.storage import Storage, modified_time


class TrainedHead(BaseModel):
    """A head with everything that made its inputs: the feature set (backbone, weights, size, engine) and its metrics."""

    features: FeatureSetInfo
    files: HeadFiles
    metrics: HeadMetrics

    @property
    def key(self) -> str:
        return posixpath.basename(self.files.folder)


def find_head(storage_url: str, fingerprint: str | None = None, key: str | None = None) -> TrainedHead:
    """The head `key` of the feature set `fingerprint`; by default the newest finished head (of the newest set that has one)."""
    storage = Storage(storage_url)
    found = []
    for features in list_feature_sets(storage_url):
        if fingerprint not in (None, features.fingerprint):
            continue
        heads = layout.heads_folder(features.folder)
        for folder in storage.fs.ls(heads, detail=False) if storage.exists(heads) else []:
            head_key = posixpath.basename(folder)
            if key not in (None, head_key) or (head := finished_head(storage, features.folder, head_key)) is None:
                continue
            found.append((modified_time(storage.fs.info(head.files.metrics)) or 0.0, features, head))
    if not found:
        wanted = " ".join(part for part in (f"fingerprint {fingerprint}" if fingerprint else "", f"head {key}" if key else "") if part)
        raise FeatureSetError(
            f"no finished head{' for ' + wanted if wanted else ''} under {redact(storage_url)}: "
            "run `cifar-transfer run` first, or check --storage / --fingerprint / --head-key"
        )
    _, features, head = max(found, key=lambda entry: entry[0])
    return TrainedHead(features=features, files=head.files, metrics=head.metrics)
