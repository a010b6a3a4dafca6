"""Test-side helpers for the local multi-process launcher."""

import pytest

from integration.runtime.spawn import free_port, run_workers  # noqa: F401


def scenario(results: list[dict], name: str) -> list[dict]:
    """Every rank's result of one scenario of a multi-scenario launch; a scenario that raised fails only
    its own test (the launch runs many scenarios to pay the start-up once)."""
    errors = [f"rank {r}: {res[name]['error']}" for r, res in enumerate(results) if "error" in res[name]]
    if errors:
        pytest.fail(f"scenario {name} raised:\n" + "\n".join(errors))
    return [res[name] for res in results]
