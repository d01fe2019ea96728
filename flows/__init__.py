"""Prefect flows and the command line of the transfer-learning pipeline."""

from cifar_transfer.hardware import avoid_huge_page_stalls

# Every process of the pipeline (the command line, a deployment's flow run) imports this package before its first
# large array.
avoid_huge_page_stalls()
