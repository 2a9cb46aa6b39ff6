"""The base of every error dsv4 raises for bad input, so a caller (the `dsv4` command line, a server) can tell
"the input is wrong, here is why" from a bug. Each package defines its own errors on top of it (`ConfigError`,
`CheckpointError`, ...); the messages name the file, field or parameter and the problem.

This module imports nothing, so any layer can use it.
"""
from __future__ import annotations

__all__ = ["DsV4Error", "InvalidArgument"]


class DsV4Error(Exception):
    """Bad input or an unusable environment, reported by dsv4 with a message that says what to change."""


class InvalidArgument(DsV4Error, ValueError):
    """An argument has the wrong type or a value out of range (the message names the parameter and the value)."""
