"""The megatron-core versions this integration supports, checked once at import.

The adapter plugs into Megatron-core's layer-spec API (ModuleSpec builders called with a
``pg_collection``) and its ``[s, b, h]`` activation and CP-chunking conventions. Those signatures move
between minor releases, so the range is exactly what the tests have run against.
"""

from __future__ import annotations

import importlib.metadata
import re

MINIMUM_VERSION = (0, 16)
"""Oldest supported megatron-core (inclusive), as (major, minor)."""
MAXIMUM_VERSION = (0, 17)
"""First unsupported megatron-core (exclusive), as (major, minor)."""
SUPPORTED_RANGE = ">=0.16,<0.17"
"""The same range as a pip requirement specifier."""


class MegatronVersionError(ImportError):
    """megatron-core is missing or outside SUPPORTED_RANGE."""


def parse_version(text: str) -> tuple[int, int]:
    """(major, minor) of a version string such as "0.16.1" or "0.16.0rc2"."""
    match = re.match(r"\s*(\d+)\.(\d+)", text)
    if match is None:
        raise MegatronVersionError(
            f"spindle.integrations.megatron: cannot read the megatron-core version {text!r}; "
            f"install a release in {SUPPORTED_RANGE} (pip install 'megatron-core{SUPPORTED_RANGE}')"
        )
    return int(match.group(1)), int(match.group(2))


def installed_version() -> str:
    """The installed megatron-core version string; MegatronVersionError if it is not installed."""
    try:
        return importlib.metadata.version("megatron-core")
    except importlib.metadata.PackageNotFoundError:
        pass
    try:  # a source checkout on PYTHONPATH has no distribution metadata
        from megatron.core.package_info import __version__
    except ImportError as error:
        raise MegatronVersionError(
            "spindle.integrations.megatron needs megatron-core, which is not installed; "
            f"install it with: pip install 'megatron-core{SUPPORTED_RANGE}' (or `make setup`)"
        ) from error
    return str(__version__)


def check_version(version: str | None = None) -> str:
    """Raise MegatronVersionError unless megatron-core `version` (default: installed) is supported."""
    version = installed_version() if version is None else version
    found = parse_version(version)
    if not MINIMUM_VERSION <= found < MAXIMUM_VERSION:
        raise MegatronVersionError(
            f"spindle.integrations.megatron supports megatron-core {SUPPORTED_RANGE}, found {version}; "
            f"install a supported release: pip install 'megatron-core{SUPPORTED_RANGE}'"
        )
    return version
