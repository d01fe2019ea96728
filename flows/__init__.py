"""Prefect flows and the command line of the CIFAR-10 transfer-learning pipeline."""
