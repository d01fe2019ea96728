"""Task: batch inference over a source with a finished head, into a predictions table."""

from __future__ import annotations

import logging

from prefect import task

from cifar_transfer import layout
from cifar_transfer.config import stable_hash
from cifar_transfer.predict import predict, write_predictions
from cifar_transfer.redact import redact
from cifar_transfer.storage import Storage
from cifar_transfer.trained import find_head

log = logging.getLogger("cifar_transfer.predict")


@task(name="predict")
def predict_task(storage_url: str, source: str, output: str | None, fingerprint: str | None, head_key: str | None) -> str:
    """Predict every image of `source`; returns where the table went (by default under the head's key in storage)."""
    head = find_head(storage_url, fingerprint, head_key)
    destination = output or layout.batch_predictions(Storage(storage_url), head.key, stable_hash({"source": redact(source)}, 12))
    rows = write_predictions(predict(source, storage_url, head.features.fingerprint, head.key), destination,
                             {"head_key": head.key, "fingerprint": head.features.fingerprint, "source": redact(source)})
    log.info("predicted %d images of %s with head %s: %s", rows, redact(source), head.key, destination)
    return destination
