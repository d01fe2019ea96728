"""Prefect caching keyed on committed outputs, never on run ids or arrays.

A task's cache key is the identity of every file the stage commits (path,
size, modification time), or None while any of them is missing or invalid,
so a deleted or damaged output always runs the stage again (never Cached, then
a missing file). After a task commits
its output it stores its result under that output's key, so the very next
run shows the work as Cached in the Prefect UI. The key also covers the
result's schema, so a cache written by an older version of a task, whose
result has another shape, is never handed to newer code.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

from prefect.results import get_result_store
from pydantic import BaseModel

from cifar_transfer.config import stable_hash
from cifar_transfer.storage import Storage, file_stamp


def committed_files_key(storage: Storage, paths: list[str]) -> str | None:
    """Identity of committed files, or None if any of them is not there."""
    identities = []
    for path in paths:
        if not storage.exists(path):
            return None
        info = storage.fs.info(path)
        identities.append({"url": storage.uri(path), "size": info.get("size"), "version": file_stamp(info)})
    return stable_hash({"files": identities}, 32)


@cache
def _schema_hash(result_type: type[BaseModel]) -> str:
    return stable_hash(result_type.model_json_schema(), 16)


def _result_key(output_key: str | None, result_type: type[BaseModel]) -> str | None:
    return None if output_key is None else f"{output_key}-{_schema_hash(result_type)}"


def output_key_fn(key_of: Callable[..., str | None], result_type: type[BaseModel]):
    """A Prefect `cache_key_fn` from a function of the task's own parameters and the type the task returns."""

    def cache_key(context, parameters) -> str | None:
        return _result_key(key_of(**parameters), result_type)

    return cache_key


def remember_output(result: BaseModel, output_key: str | None):
    """Cache `result` under the key of the output it just committed; return it."""
    key = _result_key(output_key, type(result))
    if key is not None:
        get_result_store().write(result, key=key)
    return result
