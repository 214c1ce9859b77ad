"""The Prefect-free core of prefect-flux-kontext: API client, input schema, manifests, sandbox, CLI."""

__version__ = "0.1.0"
