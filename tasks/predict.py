"""Task: batch inference over a source with a finished head, into a predictions table."""

from __future__ import annotations

import logging

from prefect import task

from cifar_transfer import layout
from cifar_transfer.config import stable_hash
from cifar_transfer.predict import check_output, predict, write_predictions
from cifar_transfer.redact import redact, refuse_secrets
from cifar_transfer.storage import Storage
from cifar_transfer.trained import find_head

log = logging.getLogger("cifar_transfer.predict")


@task(name="predict")
def predict_task(
    storage_url: str, source: str, output: str | None, fingerprint: str | None, head_key: str | None, overwrite: bool = False
) -> str:
    """Predict every image of `source`; returns where the table went (by default under the head's key in storage,
    replaced by a later run on the same source; a given `output` only with `overwrite`)."""
    for option, value in (("storage", storage_url), ("source", source), ("output", output)):
        refuse_secrets(option, value)
    head = find_head(storage_url, fingerprint, head_key)
    destination = output or layout.batch_predictions(Storage(storage_url), head.key, stable_hash({"source": redact(source)}, 12))
    check_output(destination, overwrite or output is None)  # before the backbone is built
    rows = write_predictions(
        predict(source, storage_url, head.features.fingerprint, head.key),
        destination,
        {"head_key": head.key, "fingerprint": head.features.fingerprint, "source": redact(source)},
    )
    log.info("predicted %d images of %s with head %s: %s", rows, redact(source), head.key, destination)
    return destination
