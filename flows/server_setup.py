"""Prepare a Prefect server for prefect.yaml's deployments; rerunning it changes nothing.

    python -m cifar_transfer.flows.server_setup [--gpus N] [--automations deploy/automations.yaml]

- the process work pool `cifar-transfer`, its queue `cpu`, and one queue `gpu-<i>` per GPU with a concurrency limit
  of 1, so at most one run at a time uses each GPU (prefect.yaml sends extraction to `gpu-0`);
- the block type `cifar-transfer-storage-credentials` (`cifar_transfer.tasks.credentials`), so the UI can create one;
- the automations of a file in the repo (deploy/automations.yaml), replacing those of the same name. The file has the
  shape `prefect automation create --from-file` reads, except that an action names its notification block as
  `block: <block type slug>/<block name>` instead of the block's id, which differs per server.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

import yaml
from prefect.client.orchestration import PrefectClient, get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.events.schemas.automations import AutomationCore
from prefect.exceptions import ObjectNotFound
from prefect.workers.process import ProcessWorker

from cifar_transfer.errors import ConfigError
from cifar_transfer.tasks.credentials import StorageCredentials

POOL = "cifar-transfer"
AUTOMATIONS = Path(__file__).resolve().parents[1] / "deploy" / "automations.yaml"


async def ensure_pool(client: PrefectClient, gpus: int) -> list[str]:
    """The pool and its queues, created where missing; each GPU queue's limit set to 1. The queues' names."""
    try:
        await client.read_work_pool(POOL)
    except ObjectNotFound:
        template = ProcessWorker.get_default_base_job_template()
        await client.create_work_pool(WorkPoolCreate(name=POOL, type="process", base_job_template=template))
    queues = {"cpu": None, **{f"gpu-{number}": 1 for number in range(gpus)}}
    for name, limit in queues.items():
        try:
            queue = await client.read_work_queue_by_name(name, work_pool_name=POOL)
        except ObjectNotFound:
            await client.create_work_queue(name, work_pool_name=POOL, concurrency_limit=limit)
            continue
        if queue.concurrency_limit != limit:
            await client.update_work_queue(queue.id, concurrency_limit=limit)
    return list(queues)


async def create_automations(client: PrefectClient, path: Path) -> list[str]:
    """The automations of `path`, each replacing any of its name; their names."""
    data = yaml.safe_load(path.read_text())
    created = []
    for described in data["automations"] if isinstance(data, dict) else data:
        for action in described.get("actions", []):
            if "block" in action:
                action["block_document_id"] = str(await _block_id(client, action.pop("block"), described["name"], path))
        automation = AutomationCore.model_validate(described)
        for existing in await client.read_automations_by_name(automation.name):
            await client.delete_automation(existing.id)
        await client.create_automation(automation)
        created.append(automation.name)
    return created


async def _block_id(client: PrefectClient, reference: str, automation: str, path: Path) -> Any:
    slug, _, name = reference.partition("/")
    try:
        return (await client.read_block_document_by_name(name, block_type_slug=slug)).id
    except ObjectNotFound:
        raise ConfigError(
            f"{path.name}: automation {automation!r} notifies the block {reference}, which this server does not have: "
            "create it (docs/deploy.md, 'A failure reaches a person'), then run this again"
        ) from None


async def set_up(gpus: int, automations: Path) -> str:
    async with get_client() as client:
        queues = await ensure_pool(client, gpus)
        await StorageCredentials.aregister_type_and_schema(client=client)
        created = await create_automations(client, automations)
    return (
        f"pool {POOL} (queues {', '.join(queues)}), block type {StorageCredentials.get_block_type_slug()}, automations {', '.join(created)}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cifar_transfer.flows.server_setup", description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, default=1, help="GPU queues to create, gpu-0 … gpu-<N-1> (default: 1)")
    parser.add_argument("--automations", type=Path, default=AUTOMATIONS, help="the automations file (default: deploy/automations.yaml)")
    options = parser.parse_args(argv)
    try:
        print(asyncio.run(set_up(options.gpus, options.automations)))
    except ConfigError as error:
        print(f"server_setup: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
