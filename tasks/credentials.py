"""Object-storage credentials from a Prefect block, never from parameters.

A deployment (or `--storage-credentials`) names a `cifar-transfer-storage-credentials` block; its secret fsspec
options (S3: `key`, `secret`, `endpoint_url`; GCS: `token`; Azure: `account_name`, `account_key`) are read from the
Prefect API when a storage is opened, and passed to fsspec only: no parameter, log line, record or artifact holds
them. The block's name goes in `CIFAR_TRANSFER_STORAGE_CREDENTIALS`, so the processes a run starts (Dask or Ray
workers on its host) open the storage with the same block.

The project's own block, not prefect-aws's `AwsCredentials`: storage goes through fsspec, and one block of fsspec
options serves S3, GCS and Azure alike, with no extra package on the workers.
"""

from __future__ import annotations

import functools
import os
from typing import Any, cast

from prefect.blocks.core import Block
from prefect.types import SecretDict
from pydantic import Field

from cifar_transfer.errors import ConfigError
from cifar_transfer.storage import OBJECT_STORES, set_storage_options

CREDENTIALS_ENV = "CIFAR_TRANSFER_STORAGE_CREDENTIALS"


class StorageCredentials(Block):
    """fsspec options for object storage, held as secrets (masked in the UI and the API)."""

    _block_type_name = "cifar-transfer storage credentials"
    _block_type_slug = "cifar-transfer-storage-credentials"
    _description = "fsspec options for the pipeline's storage: S3 key, secret, endpoint_url; GCS token; Azure account_name, account_key"

    options: SecretDict = Field(description="the keyword arguments fsspec's filesystem takes (s3fs, gcsfs, adlfs)")


def use_storage_credentials(block_name: str | None) -> None:
    """Open every object storage of this process, and of the processes it starts, with the block `block_name`
    (None: with the environment's credentials only)."""
    if block_name:
        os.environ[CREDENTIALS_ENV] = block_name
    else:
        os.environ.pop(CREDENTIALS_ENV, None)


@functools.cache
def _block_options(block_name: str) -> dict[str, Any]:
    try:
        block = cast(StorageCredentials, StorageCredentials.load(block_name))  # storage is opened from sync code
    except ValueError:
        raise ConfigError(
            f"storage credentials block {block_name!r} does not exist on this Prefect server: create it "
            "(docs/deploy.md, 'Storage and its credentials') or pass no --storage-credentials"
        ) from None
    return dict(block.options.get_secret_value())


def _options_for(url: str) -> dict[str, Any]:
    block_name = os.environ.get(CREDENTIALS_ENV)
    protocol = url.split("://", 1)[0] if "://" in url else "file"
    return _block_options(block_name) if block_name and protocol in OBJECT_STORES else {}


set_storage_options(_options_for)
