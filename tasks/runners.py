"""Where shard tasks run: an existing engine chosen by configuration, never a scheduler of our own.

Shards take only paths and small values and each worker process builds its
backbone once (see `tasks.extract`), so the same tasks run in this process's
thread pool or on a Dask cluster without a change of code.
"""

from __future__ import annotations

from prefect.task_runners import ThreadPoolTaskRunner

from tasks.config import PipelineConfig


def shard_runner(config: PipelineConfig):
    """The Prefect task runner the shard tasks of this run go to."""
    if config.task_runner == "dask":
        from prefect_dask import DaskTaskRunner

        if config.dask_address:
            return DaskTaskRunner(address=config.dask_address)
        # One single-threaded Dask worker per process: TensorFlow brings its own threads.
        return DaskTaskRunner(cluster_kwargs={"n_workers": config.workers, "threads_per_worker": 1, "processes": True})
    # Two threads: while one shard runs the backbone, the other reads its rows or writes Parquet.
    return ThreadPoolTaskRunner(max_workers=2)
