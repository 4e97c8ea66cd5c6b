"""The one exception type for mistakes a user can make: bad input, config, data or checkpoint."""


class NanoGPTError(Exception):
    """A user-facing error: its message is one line that says what was wrong, where and how to fix it.

    Entry points print it as ``error: <message>`` and exit non-zero, without a traceback.
    """


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (or its type's name): libraries' messages can span many lines."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
