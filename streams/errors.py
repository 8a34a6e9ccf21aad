"""Errors that stop a command at start with one line on stderr and no traceback
(:func:`fraudstream.streams.cli.main.main` prints them): a setting that cannot be used, a file that
cannot
be read, a service that cannot be reached."""

from __future__ import annotations

#: Exit codes: the configuration must be changed (a value, a file, credentials), or a
#: service it names could not be reached (it may be tried again later).
CONFIG_EXIT = 2
UNREACHABLE_EXIT = 3


class StartError(RuntimeError):
    """A command cannot start; the message is one line that names the setting or service
    at fault."""

    def __init__(self, message: str, exit_code: int = CONFIG_EXIT) -> None:
        super().__init__(" ".join(message.split()))  # always one line
        self.exit_code = exit_code
