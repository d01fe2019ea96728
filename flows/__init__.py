"""Prefect flows and the command line of the transfer-learning pipeline."""
