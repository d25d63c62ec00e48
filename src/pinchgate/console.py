"""Messages for the user: stderr, from the main process only (one line per message)."""

from __future__ import annotations

import os

from rich.console import Console


def is_main_process() -> bool:
    """Rank 0 of a multi-process run (torchrun and accelerate launch set RANK), or the only
    process. Read from the environment: creating accelerate's shared state here, before the
    training loop creates its Accelerator, would fix the wrong distributed setup."""
    return os.environ.get("RANK", "0") == "0"


def stderr_console() -> Console:
    """The console of every status line: stderr, never wrapped (`soft_wrap`). Rich would
    otherwise break lines at 80 columns when stderr is not a terminal, splitting a log line,
    and a phrase, wherever a long path ends."""
    return Console(stderr=True, soft_wrap=True)


def say(message: str) -> None:
    """Print one status line on stderr, once per run however many processes train."""
    if is_main_process():
        stderr_console().print(message, highlight=False)
