"""Fixtures for the Slurm tests: the shipped scripts and a private single-node cluster."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # cluster.py next to this file

from cluster import LocalSlurmCluster, why_unavailable  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slurm: starts a private single-node Slurm cluster (munged, slurmctld, slurmd)"
    )


@pytest.fixture(scope="module")
def slurm_cluster():
    """A running `LocalSlurmCluster`; skipped (with the reason) where Slurm cannot start here."""
    reason = why_unavailable()
    if reason:
        pytest.skip(f"no local Slurm cluster: {reason}")
    cluster = LocalSlurmCluster().start()
    try:
        yield cluster
    finally:
        cluster.stop()
