"""Hydra-configured, Ray-distributed, MLflow-tracked PyTorch training. See README.md."""
