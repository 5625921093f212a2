"""Exceptions the command line turns into exit statuses (torch-free, so every command can catch them)."""

from __future__ import annotations


class TrainingInterrupted(Exception):
    """SIGINT/SIGTERM arrived; a checkpoint was written. Carries the exit status to use."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code
