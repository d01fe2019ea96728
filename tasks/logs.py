"""One logger for plain functions: Prefect's run logger inside a run, stdlib outside."""

import logging

from prefect.exceptions import MissingContextError
from prefect.logging import get_run_logger


def logger() -> logging.Logger | logging.LoggerAdapter:
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("cifar_transfer")
