"""Where shard tasks run: an existing engine chosen by configuration, never a scheduler of our own.

Shards take only paths and small values and each worker process builds its
backbone once (see `tasks.extract`), so the same tasks run in this process's
thread pool, on a Dask cluster or on a Ray cluster without a change of code.

GPUs: a local Dask cluster on a machine with several GPUs gets workers pinned
round-robin to them (`CUDA_VISIBLE_DEVICES` set per worker process, which
LocalCluster cannot do: it gives every worker the same environment); on Ray
each shard task asks for one GPU when the cluster has any, and Ray pins it.
Without GPUs both are exactly the CPU setup.
"""

from __future__ import annotations

from prefect.task_runners import ThreadPoolTaskRunner

from cifar_transfer.config import RunnerSettings
from cifar_transfer.errors import ConfigError
from cifar_transfer.hardware import cuda_ids, gpus


def shard_runner(settings: RunnerSettings):
    """The Prefect task runner the shard tasks of this run go to."""
    if settings.task_runner == "dask":
        from prefect_dask import DaskTaskRunner

        if settings.dask_address:
            return DaskTaskRunner(address=settings.dask_address)
        devices = visible_gpu_ids()
        if len(devices) > 1:
            return DaskTaskRunner(cluster_class="distributed.SpecCluster", cluster_kwargs=gpu_cluster_spec(devices, settings.workers))
        # One single-threaded Dask worker per process: TensorFlow brings its own threads.
        return DaskTaskRunner(cluster_kwargs={"n_workers": settings.workers, "threads_per_worker": 1, "processes": True})
    if settings.task_runner == "ray":
        return ray_runner(settings)
    # Two threads, for the two task runs `runs_at_once` keeps going; each reads and writes its shards in threads of
    # its own while the engine computes (`extract.extract_shards`).
    return ThreadPoolTaskRunner(max_workers=2)


def runs_at_once(settings: RunnerSettings) -> int:
    """Shard task runs kept going at once: two in this process (one's start and end overlap the other's work, on one
    engine), else one per worker process."""
    return 2 if settings.task_runner == "thread" else max(2, settings.workers)


def visible_gpu_ids() -> list[str]:
    """The CUDA ids of this machine's usable GPUs, as CUDA_VISIBLE_DEVICES names them (empty without GPUs)."""
    return cuda_ids(len(gpus()))


def gpu_cluster_spec(devices: list[str], workers: int) -> dict:
    """`SpecCluster` arguments: max(workers, GPUs) single-threaded worker processes, pinned round-robin to `devices`."""
    from distributed import Nanny, Scheduler

    return {
        "scheduler": {"cls": Scheduler, "options": {"host": "127.0.0.1", "dashboard_address": ":0"}},
        "workers": {
            f"gpu{devices[number % len(devices)]}-{number}": {
                "cls": Nanny,
                "options": {"nthreads": 1, "host": "127.0.0.1", "env": {"CUDA_VISIBLE_DEVICES": devices[number % len(devices)]}},
            }
            for number in range(max(workers, len(devices)))
        },
    }


def ray_runner(settings: RunnerSettings):
    """A Ray task runner: the cluster at --ray-address, or a local Ray with --workers CPUs."""
    try:
        import ray
        from prefect_ray import RayTaskRunner
        from prefect_ray.context import remote_options
    except ImportError:
        raise ConfigError("task runner 'ray' needs prefect-ray: pip install prefect-ray, or pass --task-runner dask") from None

    class ShardRayTaskRunner(RayTaskRunner):
        """Each shard task takes one GPU when the cluster has GPUs (Ray pins it), and keeps its worker.

        Ray retires a GPU task's worker after one call unless told otherwise (max_calls=1),
        which would rebuild the backbone for every shard; max_calls=0 keeps the worker.
        """

        def submit(self, task, parameters, wait_for=None, dependencies=None):
            with remote_options(**({"num_gpus": 1, "max_calls": 0} if ray.cluster_resources().get("GPU", 0) >= 1 else {})):
                return super().submit(task, parameters, wait_for, dependencies)

    if settings.ray_address:
        return ShardRayTaskRunner(address=settings.ray_address)
    return ShardRayTaskRunner(init_kwargs={"num_cpus": settings.workers, "include_dashboard": False})
