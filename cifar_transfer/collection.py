"""Collections (an image folder tree, a Parquet table of images): listed cheaply, planned incrementally, read per shard.

A collection is never copied or held in memory: each shard reads and decodes just its images, straight from
the source, resized once from their original size to the backbone's input. Its features' fingerprint names
the collection (format, root, split rule, classes: `Listing.identity`), not its content, so when images are
added, removed or changed the next run keeps every shard whose images are all unchanged, replaces each
shard that held a removed or changed image, and puts new images in new shards; a new manifest version then
lists old and new shards at once (see `commit.write_manifest`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import pyarrow as pa
from pydantic import BaseModel

from cifar_transfer import layout, records
from cifar_transfer.config import CollectionSettings, stable_hash
from cifar_transfer.errors import SourceError
from cifar_transfer.feature_records import read_manifest
from cifar_transfer.redact import printable, redact
from cifar_transfer.shard_files import shard_items_from_metadata, shard_metadata
from cifar_transfer.shards import FLIPPED, SPLITS, Shard, ShardRows
from cifar_transfer.sources import detect
from cifar_transfer.sources.base import CollectionSource, Item, Listing, UnreadableItem
from cifar_transfer.sources.folder import FolderSource
from cifar_transfer.sources.parquet import ParquetSource
from cifar_transfer.storage import Storage

log = logging.getLogger(__name__)


class CollectionDataset(BaseModel):
    """A listed collection: what planning and reading its shards need (the items themselves go into the shards)."""

    id: str  # names the collection in the features' fingerprint (`FeatureSpec.dataset_id`)
    settings: CollectionSettings
    format: str  # "folder" or "parquet"
    classes: list[str]
    sizes: dict[str, int]
    skipped: list[str]
    unusable: dict[str, list[UnreadableItem]] = {}  # by split: images without a usable label (in `<view>/_skipped.json`)
    listing_digest: str  # changes whenever an image is added, removed or changed

    @property
    def collection(self) -> CollectionSettings:
        return self.settings

    def plan_shards(self, storage: Storage, folder: str, shard_size: int, flip: bool) -> tuple[list[Shard], dict[str, list[str]]]:
        plan = plan_collection(storage, folder, listing_of(self), shard_size, flip)
        return plan.shards, plan.retired

    def shard_rows(self, storage_url: str, shard: Shard, input_size: int) -> tuple[np.ndarray, ShardRows]:
        """The decodable items of the shard, each row's id its place in the plan (an undecodable one leaves its id unused)."""
        decoded = collection_images(self, shard, input_size)
        position = {item.key: number for number, item in enumerate(shard.items or [])}
        ids = np.array([shard.start + position[item.key] for item in decoded.items], np.int64)
        labels = np.array([item.label for item in decoded.items], np.int64)
        return decoded.images, ShardRows(labels=labels, ids=ids, items=decoded.items, skipped=decoded.skipped)

    def calibration_rows(self, storage_url: str, count: int, input_size: int) -> tuple[np.ndarray, np.ndarray]:
        items = listing_of(self).splits["train"][:count]
        first = Shard(split="train", number=0, start=0, stop=len(items), items=items)
        images, rows = self.shard_rows(storage_url, first, input_size)
        return images, rows.labels


def _open_folder(settings: CollectionSettings) -> CollectionSource:
    return FolderSource(settings.source, test_fraction=settings.test_fraction, split_seed=settings.seed, max_file_mb=settings.max_file_mb)


def _open_table(settings: CollectionSettings) -> CollectionSource:
    return ParquetSource(
        settings.source,
        image_column=settings.image_column,
        label_column=settings.label_column,
        classes_file=settings.classes,
        test_fraction=settings.test_fraction,
        split_seed=settings.seed,
        max_file_mb=settings.max_file_mb,
    )


# Every collection format, by the name `--source-format` and `detect.collection_format` give it.
COLLECTION_FORMATS: dict[str, Callable[[CollectionSettings], CollectionSource]] = {"folder": _open_folder, "parquet": _open_table}


def open_collection(settings: CollectionSettings) -> CollectionSource:
    return COLLECTION_FORMATS[detect.collection_format(settings.source, settings.source_format)](settings)


def list_collection(settings: CollectionSettings) -> tuple[CollectionDataset, Listing]:
    """What the collection holds now, and its identity; logs the counts and what was skipped."""
    listing = open_collection(settings).list_items()
    digest = stable_hash({split: [[item.key, item.version, item.label] for item in items] for split, items in listing.splits.items()}, 32)
    dataset = CollectionDataset(
        id=stable_hash(listing.identity, 32),
        settings=settings,
        format=listing.identity["format"],
        classes=listing.classes,
        sizes={split: len(listing.splits.get(split, [])) for split in SPLITS},
        skipped=listing.skipped,
        unusable=listing.unusable,
        listing_digest=digest,
    )
    unusable = [f"{entry.key}: {entry.reason}" for entries in listing.unusable.values() for entry in entries]
    log.info(
        "listed %s (%s): %s; %d classes; %d entries skipped",
        redact(settings.source),
        dataset.format,
        ", ".join(f"{split} {size} images" for split, size in dataset.sizes.items()),
        len(dataset.classes),
        len(listing.skipped) + len(unusable),
    )
    for entry in (listing.skipped + unusable)[:20]:
        log.warning("skipped %s", printable(entry))
    if not dataset.sizes["train"] or not dataset.sizes["test"]:
        raise SourceError(
            f"source {redact(settings.source)} has {dataset.sizes['train']} train and {dataset.sizes['test']} test images: "
            "both splits need images (check the layout, or --test-fraction)"
        )
    _recent_listings[digest] = listing
    while len(_recent_listings) > 2:
        _recent_listings.pop(next(iter(_recent_listings)))
    return dataset, listing


_recent_listings: dict[str, Listing] = {}  # this process's last listings, by digest


def listing_of(dataset: CollectionDataset) -> Listing:
    """The listing `dataset` was made from: kept in this process since it was listed (a listing of 200,000 files
    takes seconds), else listed again (another process; the collection may have changed since, which is fine:
    the plan follows what is there now)."""
    return _recent_listings.get(dataset.listing_digest) or list_collection(dataset.settings)[1]


class WatchResult(BaseModel):
    """What a watch saw: the collection now, and whether it changed since the watch before."""

    dataset: CollectionDataset
    changed: bool
    previous_digest: str | None


def watch_collection(settings: CollectionSettings, storage_url: str) -> WatchResult:
    """List the collection (no image is read) and remember its digest; `changed` when it differs from the last one seen."""
    dataset, _ = list_collection(settings)
    storage = Storage(storage_url)
    record = layout.watch_record(storage, dataset.id)
    seen = records.WATCH.read(storage.read_bytes(record), storage.uri(record)) if storage.exists(record) else {}
    previous = seen.get("listing_digest")
    if previous != dataset.listing_digest:
        storage.write_atomic(record, records.WATCH.dump({"listing_digest": dataset.listing_digest, "sizes": dataset.sizes}))
    return WatchResult(dataset=dataset, changed=previous != dataset.listing_digest, previous_digest=previous)


class CollectionPlan(BaseModel):
    """The shards of the features' next version, and the files of the current version they replace."""

    shards: list[Shard]
    retired: dict[str, list[str]]  # view -> shard files no longer listed (deleted by the version after next)


def plan_collection(storage: Storage, folder: str, listing: Listing, shard_size: int, flip: bool) -> CollectionPlan:
    """Keep each shard of the current version whose images are all unchanged; replace the others; add the new images.

    Deterministic given the current manifests and the listing, so a run that resumes after a crash plans the
    same shards and finds the ones it had finished.
    """
    shards, retired = [], {}
    for split in SPLITS:
        planned, retiring = _plan_view(storage, folder, split, listing.splits.get(split, []), shard_size)
        shards += planned
        retired[split] = retiring
        if flip:
            view = f"{split}{FLIPPED}"
            shards += [shard.model_copy(update={"split": view}) for shard in planned]
            retired[view] = retiring
    return CollectionPlan(shards=shards, retired=retired)


def _plan_view(storage: Storage, folder: str, split: str, items: list[Item], shard_size: int) -> tuple[list[Shard], list[str]]:
    current = {item.key: item for item in items}
    unchanged = {(item.key, item.version, item.label): item for item in items}  # what a kept shard's footer must list
    manifest = read_manifest(storage, folder, split)
    records = manifest.shards if manifest else []
    planned: list[Shard] = []
    retired: list[str] = []
    placed: set[str] = set()
    next_number = max((record.number + 1 for record in records), default=0)
    for record in records:
        held = _held_items(storage, layout.shard_file(folder, split, record.file))
        found = [unchanged.get(entry) for entry in held or []]
        kept = [item for item in found if item is not None]
        if held is not None and len(kept) == len(found):
            planned.append(Shard(split=split, number=record.number, start=record.start, stop=record.stop, items=kept))
            placed.update(item.key for item in kept)
            continue
        retired.append(record.file)
        survivors = [current[key] for key, _, _ in held or [] if key in current]
        if survivors:  # one replacement per changed shard: a change touches only the shard that held it
            planned.append(_new_shard(split, next_number, survivors, shard_size))
            placed.update(item.key for item in survivors)
            next_number += 1
    new = [item for item in items if item.key not in placed]  # the listing is sorted by key
    for start in range(0, len(new), shard_size):
        planned.append(_new_shard(split, next_number, new[start : start + shard_size], shard_size))
        next_number += 1
    return planned, retired


def _new_shard(split: str, number: int, items: list[Item], shard_size: int) -> Shard:
    start = number * shard_size
    return Shard(split=split, number=number, start=start, stop=start + len(items), items=items)


def _held_items(storage: Storage, path: str) -> list[tuple[str, str, int]] | None:
    """The (key, version, label) of each item a finished collection shard was made from (its footer lists them),
    or None if it is unreadable."""
    try:
        _, metadata = shard_metadata(storage, path)
    except (OSError, ValueError, pa.ArrowException):  # unreadable footer, or metadata that is not JSON
        return None
    return shard_items_from_metadata(metadata)


class CollectionImages(BaseModel):
    """A collection shard's decoded images (row for row with `items`) and the items that could not be used."""

    model_config = {"arbitrary_types_allowed": True}

    images: np.ndarray  # uint8 (n, size, size, 3)
    items: list[Item]
    skipped: list[UnreadableItem]


def collection_images(dataset: CollectionDataset, shard: Shard, size: int) -> CollectionImages:
    """Read and decode the shard's images straight from the source, resized once to `size`; mirrored for a flipped view.

    Each image is decoded into its row of one array, on every core, and those that could not be read or decoded
    are left out in place (`decode_kept`: no list of images stacked afterwards, since at 224 px a shard's pixels
    are 150 MB and two shards are in flight).
    """
    from cifar_transfer.sources.images import decode_kept

    items = shard.items or []
    read = open_collection(dataset.settings).read_items(items)
    pixels = np.empty((len(items), size, size, 3), np.uint8)
    images, reasons = decode_kept(pixels, ((data, reason) for _, data, reason in read), mirrored=shard.flipped)
    outcomes = list(zip(items, reasons, strict=True))
    skipped = [UnreadableItem(key=item.key, reason=reason) for item, reason in outcomes if reason is not None]
    for entry in skipped:
        log.warning("extract[%s]: skipped %s: %s", shard.name, entry.key, entry.reason)
    return CollectionImages(images=images, items=[item for item, reason in outcomes if reason is None], skipped=skipped)


def thumbnails(settings: CollectionSettings, keys: list[str], size: int) -> np.ndarray:
    """Small pictures of the named images for the report (a grey square where one can no longer be read)."""
    from cifar_transfer.sources.images import decode_into

    pictures = np.full((len(keys), size, size, 3), 128, np.uint8)  # the rows decode_into cannot fill stay grey
    items = [Item(key=key, label=0, version="") for key in keys]
    decode_into(pictures, ((data, reason) for _, data, reason in open_collection(settings).read_items(items)))
    return pictures
