"""Test-wide settings: the checkpoint signing key lives in a temporary config directory, never in the
home directory of whoever runs the tests (subprocesses and Ray workers inherit it)."""
from __future__ import annotations

import os
import shutil
import tempfile

import pytest


def pytest_configure(config: pytest.Config) -> None:
    directory = tempfile.mkdtemp(prefix="spindle-config-")
    os.environ["SPINDLE_CONFIG_DIR"] = directory
    config.add_cleanup(lambda: shutil.rmtree(directory, ignore_errors=True))
