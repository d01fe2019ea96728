"""The shape every source takes once made ready for extraction (see `sources.kinds` for the kinds themselves)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import numpy as np
    from pydantic import BaseModel

    from cifar_transfer.shards import Shard, ShardRows
    from cifar_transfer.sources.base import UnreadableItem
    from cifar_transfer.storage import Storage


class SourceDataset(Protocol):
    """A source made ready for extraction: what planning, extraction, calibration and commit need of it."""

    classes: list[str]
    sizes: dict[str, int]

    @property
    def id(self) -> str:
        """Names the images in the features' fingerprint (`FeatureSpec.dataset_id`)."""
        ...

    @property
    def collection(self) -> BaseModel | None:
        """How to read the source again, recorded with its feature set (None: an archive, known by its id)."""
        ...

    @property
    def unusable(self) -> dict[str, list[UnreadableItem]]:
        """By split: images the listing could not use (no usable label), recorded beside the unreadable ones."""
        ...

    def plan_shards(self, storage: Storage, folder: str, shard_size: int, flip: bool) -> tuple[list[Shard], dict[str, list[str]]]:
        """Every shard of the features' next version, and by view the files of the current version it retires."""
        ...

    def shard_rows(self, storage_url: str, shard: Shard, input_size: int) -> tuple[np.ndarray, ShardRows]:
        """The shard's images (uint8) and what its rows are."""
        ...

    def calibration_rows(self, storage_url: str, count: int, input_size: int) -> tuple[np.ndarray, np.ndarray]:
        """The first `count` train images, as extraction would feed them to the backbone, and their labels."""
        ...
