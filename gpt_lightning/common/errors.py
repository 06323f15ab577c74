"""The one exception type that entry points turn into a clear message instead of a traceback."""


class UserError(Exception):
    """Bad input the user can fix: the message says what was wrong, which value, and what to do.

    Entry points run inside `gpt_lightning.common.cli.exits_on_user_error`, which prints the message (one line
    per problem) and exits with status 2. Raise it before any expensive work starts, and only after making sure
    nothing on disk is half-written.
    """
