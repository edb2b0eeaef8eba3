"""Domain errors: each says what is wrong, with the values, and how to fix it."""

from __future__ import annotations


class PartserveError(Exception):
    """An error a user can act on; the CLI prints it as one line and exits with code 2."""

    def __init__(self, message: str, fix: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.fix = fix

    def __str__(self) -> str:
        return f"{self.message}. {self.fix}" if self.fix else self.message


class PlanError(PartserveError):
    """No partition satisfies the request (too many stages, memory cap too small)."""


class ModelError(PartserveError):
    """The model spec cannot be resolved or built."""


class ArtifactError(PartserveError):
    """A plan directory or shard is missing, unreadable or does not match its hash."""
