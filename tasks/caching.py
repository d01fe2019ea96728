"""Prefect caching keyed on committed outputs, never on run ids or arrays.

A task's cache key is the identity of the file that proves its work is done
(path, size, modification time), or None while that file is missing or
invalid, so damaged or deleted outputs always run again. After a task commits
its output it stores its result under that output's key, so the very next
run shows the work as Cached in the Prefect UI.
"""

from __future__ import annotations

from collections.abc import Callable

from prefect.results import get_result_store

from tasks.config import stable_hash
from tasks.storage import Storage


def committed_file_key(storage: Storage, path: str) -> str | None:
    """Identity of a committed file, or None if it is not there."""
    if not storage.exists(path):
        return None
    info = storage.fs.info(path)
    version = info.get("mtime") or info.get("LastModified") or info.get("ETag") or ""
    return stable_hash({"url": storage.uri(path), "size": info.get("size"), "version": str(version)}, 32)


def output_key_fn(key_of: Callable[..., str | None]):
    """A Prefect `cache_key_fn` from a function of the task's own parameters."""

    def cache_key(context, parameters) -> str | None:
        return key_of(**parameters)

    return cache_key


def remember_output(result, key: str | None):
    """Cache `result` under the key of the output it just committed; return it."""
    if key is not None:
        get_result_store().write(result, key=key)
    return result
