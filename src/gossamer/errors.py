"""Errors a user can cause outside the config schema: printed by the CLI as one line."""

from __future__ import annotations


class UserError(Exception):
    """An error the user can fix (a path, a command-line value); one line, exit code 2."""


class RankLost(Exception):
    """A rank of a sharded run stopped mid-collective; one line, exit code 3 (resumable)."""
