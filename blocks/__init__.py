"""Prefect blocks of prefect-flux-kontext (registered through the ``prefect.collections`` entry point)."""

from blocks.replicate_credentials import ReplicateCredentials

__all__ = ["ReplicateCredentials"]
