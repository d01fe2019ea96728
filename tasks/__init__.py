"""Stages of the CIFAR-10 transfer-learning pipeline: plain functions plus thin Prefect task wrappers."""
