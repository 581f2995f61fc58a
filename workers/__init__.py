"""Runs trials: datasets, the training loop and the worker process."""
