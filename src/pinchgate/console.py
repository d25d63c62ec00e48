"""Messages for the user: stderr, from the main process only (one line per message)."""

from __future__ import annotations

from accelerate import PartialState
from rich.console import Console


def say(message: str) -> None:
    """Print one status line on stderr, once per run however many processes train."""
    if PartialState().is_main_process:
        Console(stderr=True).print(message, highlight=False)
