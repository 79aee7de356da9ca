"""The one exception the data layer raises for a user's mistake."""

from __future__ import annotations


class DataError(Exception):
    """A problem with the user's data or data settings, not a bug.

    The message is one line that names the file or config value at fault and says what to do;
    the CLI prints it without a traceback, so it must make sense on its own.
    """
