"""Benchmarks of the pipeline; each script imports this package (`bench.results_log`) before it measures."""

from cifar_transfer.hardware import avoid_huge_page_stalls

# A stage measured alone runs with the memory setting the command line and flow runs make (`cifar_transfer.flows`),
# so its time is the time it takes in a run.
avoid_huge_page_stalls()
