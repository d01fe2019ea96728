"""The pipeline as Prefect flows: wiring only; the work lives in `tasks/`.

download -> decode -> choose engine -> extract shards -> manifests -> (t-SNE, head) -> report.
- `extract-features`: the features only (steps up to the manifests); on completion it
  emits the `cifar-transfer.features.completed` event downstream deployments trigger on.
- `analyze-features`: t-SNE, head and report on an existing, complete feature set.
- `cifar-transfer`: the whole job, the two above as subflows.
"""

from __future__ import annotations

from prefect import flow, tags

from tasks.cifar import DatasetInfo, decode_archive_task, plan_shards
from tasks.config import FeatureSpec, PipelineConfig
from tasks.download import fetch_archive_task
from tasks.engines import choose_engine_task, release_extractors
from tasks.extract import extract_shard_task, plan_extraction_task
from tasks.head import train_head_task
from tasks.report import ExtractionStats, publish_report_task, wait_for_shards
from tasks.runners import shard_runner
from tasks.store import FeatureSetInfo, ShardRecord, commit_feature_set_task, find_feature_set_task
from tasks.tsne import tsne_task

DEFAULT_CONFIG = PipelineConfig()  # frozen, so sharing one default instance is safe


@flow(name="extract-features", flow_run_name="extract-{config.backbone}")
def extract_features(config: PipelineConfig = DEFAULT_CONFIG) -> tuple[FeatureSetInfo, ExtractionStats]:
    archive = fetch_archive_task(config.source, config.expected_md5, config.storage)
    dataset = decode_archive_task(config.storage, archive.path, archive.md5)
    engine = choose_engine_task(config, dataset)
    spec = config.feature_spec(archive.md5, engine.engine, engine.precision)
    records, stats = extract_shards.with_options(task_runner=shard_runner(config))(config, spec, dataset)
    return commit_feature_set_task(config.storage, spec, records, dataset.classes), stats


@flow(name="extract-shards", flow_run_name="shards-{spec.backbone}")
def extract_shards(config: PipelineConfig, spec: FeatureSpec, dataset: DatasetInfo) -> tuple[list[ShardRecord], ExtractionStats]:
    """Every shard still to compute as its own task, on the task runner the config chose; finished ones are reused."""
    plan = plan_extraction_task(config.storage, spec, plan_shards(dataset.sizes, config.shard_size, config.flip))
    futures = []
    for shard in plan.to_compute:
        with tags(spec.backbone, shard.split):
            futures.append(extract_shard_task.submit(config.storage, spec, dataset, shard, config.batch_size))
    outcome = wait_for_shards(plan.reused, futures)
    release_extractors()  # shards of the thread runner ran here; Dask/Ray workers keep theirs
    return outcome


@flow(name="analyze-features", flow_run_name="analyze-{fingerprint}")
def analyze_features(
    config: PipelineConfig = DEFAULT_CONFIG, fingerprint: str | None = None, extraction: ExtractionStats | None = None
) -> dict:
    """t-SNE, head and report on the feature set `fingerprint` (default: the newest complete one)."""
    features = find_feature_set_task(config.storage, fingerprint)
    tsne = None
    if config.tsne_sample:
        tsne = tsne_task(
            config.storage, features.folder, config.tsne_key(features.fingerprint),
            config.tsne_sample, config.tsne_perplexity, config.seed, features.classes, config.tsne_test,
        )
    head = train_head_task(config.storage, features.folder, config.head_key(features.fingerprint), config.head_settings(), features.classes)
    return publish_report_task(config, features, extraction, tsne, head)


@flow(name="cifar-transfer", flow_run_name="cifar-transfer-{config.backbone}")
def cifar_transfer(config: PipelineConfig = DEFAULT_CONFIG) -> dict:
    features, extraction = extract_features(config)
    return analyze_features(config, features.fingerprint, extraction)
