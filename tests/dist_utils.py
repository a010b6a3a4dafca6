"""Test-side name for the local multi-process launcher."""

from integration.runtime.spawn import free_port, run_workers  # noqa: F401
