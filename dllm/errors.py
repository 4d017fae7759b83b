"""``UserError``: a mistake in the user's input (a flag, a config value, a file, a line of data).

The command-line entry points print a ``UserError`` as one line and exit with code 2;
anything else is a bug and keeps its traceback. It subclasses ``ValueError``, so library
callers who catch ``ValueError`` (the documented error of ``iterative_generate`` and the
objective) keep working.
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad input from the user; the message names the argument, file or line and what is wrong."""
