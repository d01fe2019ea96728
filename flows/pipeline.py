"""The pipeline as Prefect flows: wiring only; the work lives in `cifar_transfer`, its tasks in `cifar_transfer.tasks`.

download -> decode -> choose engine -> extract shards -> manifests -> (t-SNE, head) -> report.
- `extract-features`: the features only (steps up to the manifests); on completion it
  emits the `cifar-transfer.features.completed` event downstream deployments trigger on.
- `analyze-features`: t-SNE, head and report on an existing, complete feature set.
- `cifar-transfer`: the whole job, the two above as subflows.
- `predict-images`: batch inference over a source with a finished head, into a predictions table.
- `audit-features`: the audit of a feature set with a finished head (neighbours, duplicates and leakage, label
  issues, outliers); a deployment runs it when a head completes.
- `watch-collection`: lists an image folder or table (cheap, no image read) and emits
  `cifar-transfer.collection.changed` when it changed, which starts the extraction deployment.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ParamSpec, TypeVar

from prefect import flow
from prefect.futures import PrefectFuture
from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

from cifar_transfer.audit.stage import AuditResult
from cifar_transfer.config import ExtractionSettings, FeatureSpec, PipelineConfig
from cifar_transfer.extractors import release_extractors
from cifar_transfer.feature_records import FeatureSetInfo
from cifar_transfer.progress import ExtractedFeatures, ExtractedShards, ExtractionStats
from cifar_transfer.report import RunSummary
from cifar_transfer.shards import Shard
from cifar_transfer.tasks.audit import audit_task, find_head_task
from cifar_transfer.tasks.collection import watch_collection_task
from cifar_transfer.tasks.credentials import use_storage_credentials
from cifar_transfer.tasks.engines import choose_engine_task
from cifar_transfer.tasks.extract import extract_shards_task, plan_extraction_task
from cifar_transfer.tasks.features import commit_feature_set_task, find_feature_set_task
from cifar_transfer.tasks.head import train_head_task
from cifar_transfer.tasks.predict import predict_task
from cifar_transfer.tasks.progress import extract_in_runs
from cifar_transfer.tasks.report import publish_report_task
from cifar_transfer.tasks.runners import runs_at_once, shard_runner
from cifar_transfer.tasks.sources import PreparedSource, prepare_source
from cifar_transfer.tasks.tsne import tsne_task

DEFAULT_CONFIG = PipelineConfig()  # frozen, so sharing one default instance is safe (validating it imports no Keras)

P = ParamSpec("P")
R = TypeVar("R")


def subflow(run: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
    """`run(*args, **kwargs)`, a flow run inside this one's process, without a heartbeat of its own: the outermost run's
    heartbeats already say the process is alive, and each heartbeat thread costs its flow run up to a second at the
    end (Prefect's thread sleeps in whole seconds before it can be joined): three seconds of a job that reuses all."""
    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        return run(*args, **kwargs)


@flow(name="extract-features", flow_run_name="extract-{config.backbone}")
def extract_features(config: PipelineConfig = DEFAULT_CONFIG) -> tuple[FeatureSetInfo, ExtractionStats]:
    use_storage_credentials(config.storage_credentials)
    dataset = prepare_source(config)
    extraction = config.extraction_settings
    engine = choose_engine_task(extraction, config.storage, dataset)
    spec = config.feature_spec(dataset.id, engine.engine, engine.precision)
    runner = config.runner_settings
    shards = extract_shards.with_options(task_runner=shard_runner(runner))
    extracted = subflow(shards, config.storage, extraction, spec, dataset, runs_at_once(runner))
    features = commit_feature_set_task(
        config.storage, spec, extracted.records, dataset.classes, extracted.stats, extracted.retired, dataset.collection, dataset.unusable
    )
    return features, extracted.stats


@flow(name="extract-shards", flow_run_name="shards-{spec.backbone}")
def extract_shards(
    storage_url: str, settings: ExtractionSettings, spec: FeatureSpec, dataset: PreparedSource, runs_at_once: int = 2
) -> ExtractedFeatures:
    """The shards still to compute in task runs sized by time, `runs_at_once` of them going, on the task runner the
    config chose; finished ones are reused."""
    plan = plan_extraction_task(storage_url, spec, dataset, settings.shard_size, settings.flip)

    def submit(shards: list[Shard]) -> PrefectFuture[ExtractedShards]:
        # Untagged: a tagged task run first asks the server for its tags' concurrency slots, a call that took 2 s
        # at times (Prefect 3.9 on SQLite) while the engine waited for the run's shards.
        return extract_shards_task.submit(storage_url, spec, dataset, shards, settings.resolved_batch_size)

    records, stats = extract_in_runs(plan.reused, plan.to_compute, submit, runs_at_once)
    release_extractors()  # shards of the thread runner ran here; Dask/Ray workers keep theirs
    return ExtractedFeatures(records=records, stats=stats, retired=plan.retired)


@flow(name="analyze-features", flow_run_name="analyze-{fingerprint}")
def analyze_features(
    config: PipelineConfig = DEFAULT_CONFIG, fingerprint: str | None = None, extraction: ExtractionStats | None = None
) -> RunSummary:
    """t-SNE, head and report on the feature set `fingerprint` (default: the newest complete one); the map and the
    head need nothing of each other, so they run at once."""
    use_storage_credentials(config.storage_credentials)
    features = find_feature_set_task(config.storage, fingerprint)
    tsne = None
    if config.tsne_sample:
        tsne = tsne_task.submit(
            config.storage,
            features.folder,
            config.tsne_key(features.fingerprint, features.content_version),
            config.tsne_settings,
            features.classes,
        )
    head = train_head_task(
        config.storage,
        features.folder,
        config.head_key(features.fingerprint, features.content_version),
        config.head_settings,
        features.classes,
    )
    return publish_report_task(config, features, extraction, tsne.result() if tsne else None, head)


@flow(name="cifar-transfer", flow_run_name="cifar-transfer-{config.backbone}")
def cifar_transfer(config: PipelineConfig = DEFAULT_CONFIG) -> RunSummary:
    features, extraction = subflow(extract_features, config)
    return subflow(analyze_features, config, features.fingerprint, extraction)


@flow(name="watch-collection", flow_run_name="watch-{config.source_format}")
def watch_collection(config: PipelineConfig = DEFAULT_CONFIG) -> bool:
    """Whether the collection changed since the last watch (then the change event is out)."""
    use_storage_credentials(config.storage_credentials)
    run_options = config.model_dump(mode="json", exclude_defaults=True)
    return watch_collection_task(config.collection_settings, config.storage, run_options).changed


@flow(name="predict-images", flow_run_name="predict-{head_key}")
def predict_images(
    storage: str = "storage",
    source: str = "incoming",
    output: str | None = None,
    fingerprint: str | None = None,
    head_key: str | None = None,
    overwrite: bool = False,
    storage_credentials: str | None = None,
) -> str:
    """Classify every image of `source` with a finished head (default the newest); returns the predictions table's path.
    `storage_credentials` names the block that opens `storage` (see `PipelineConfig.storage_credentials`)."""
    use_storage_credentials(storage_credentials or None)
    return predict_task(storage, source, output, fingerprint, head_key, overwrite)


@flow(name="audit-features", flow_run_name="audit-{fingerprint}")
def audit_features(config: PipelineConfig = DEFAULT_CONFIG, fingerprint: str | None = None, head_key: str | None = None) -> AuditResult:
    """Audit the feature set `fingerprint` with its head `head_key` (default: the newest finished head)."""
    head = find_head_task(config.storage, fingerprint, head_key)
    return audit_task(config.storage, head, config.audit_settings)
