"""The one exception type for mistakes a user can make: bad input, config, data or checkpoint; and the argument
parser of the entry points that report a bad flag the same way."""

import argparse
import sys
from typing import NoReturn


class NanoGPTError(Exception):
    """A user-facing error: its message is one line that says what was wrong, where and how to fix it.

    Entry points print it as ``error: <message>`` and exit non-zero, without a traceback.
    """


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (or its type's name): libraries' messages can span many lines."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage mistakes (an unknown flag, a bad choice) are one ``error: ...`` line, exit 2."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)
