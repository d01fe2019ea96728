"""Object-storage credentials come from a Prefect block named in the config: read when a storage is opened, passed to
fsspec, and found nowhere else (the run as a team runs it: tests/test_team.py)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from cifar_transfer.config import PipelineConfig
from cifar_transfer.errors import ConfigError
from cifar_transfer.storage import Storage
from cifar_transfer.tasks.credentials import CREDENTIALS_ENV, StorageCredentials, use_storage_credentials


def test_a_config_names_a_block_and_never_echoes_what_is_not_a_name():
    assert PipelineConfig(storage_credentials="team-s3").storage_credentials == "team-s3"
    assert PipelineConfig(storage_credentials="").storage_credentials is None  # a deployment whose variable is unset
    with pytest.raises(ValidationError, match="is not a Prefect block's name") as refused:
        PipelineConfig(storage_credentials="AKIAEXAMPLE:wJalrXUtnFEMI")
    assert "wJalrXUtnFEMI" not in str(refused.value)
    with pytest.raises(ValidationError, match="storage is empty: .*prefect variable set cifar-transfer-storage"):
        PipelineConfig(storage="")


@pytest.mark.usefixtures("prefect_api")
def test_the_block_opens_object_storage_only_and_its_absence_is_one_line(monkeypatch):
    monkeypatch.delenv(CREDENTIALS_ENV, raising=False)
    StorageCredentials(options={"key": "block-key", "secret": "block-secret", "endpoint_url": "http://127.0.0.1:9"}).save(
        "storage-credentials-test", overwrite=True
    )
    use_storage_credentials("storage-credentials-test")
    try:
        opened = Storage("s3://bucket/prefix").fs
        assert (opened.key, opened.secret, opened.endpoint_url) == ("block-key", "block-secret", "http://127.0.0.1:9")
        assert Storage("/tmp/storage").is_local  # a local root gets no options

        use_storage_credentials("no-such-block")
        with pytest.raises(ConfigError, match="block 'no-such-block' does not exist on this Prefect server: create it"):
            Storage("s3://bucket/other").exists("s3://bucket/other")
    finally:
        use_storage_credentials(None)
    assert Storage("s3://bucket/third").fs.key is None  # back to the environment's
