"""The one wrapper every entry point runs inside: a `UserError` becomes `error: ...` and exit status 2."""

from __future__ import annotations

import logging
import sys
from contextlib import contextmanager

from gpt_lightning.common.errors import UserError

EXIT_USER_ERROR = 2


@contextmanager
def exits_on_user_error():
    """Print a UserError as one `error:` line on stderr (and into the run's log file, if one is open), exit 2."""
    try:
        yield
    except UserError as e:
        message = f"error: {e}"
        print(message, file=sys.stderr)
        # Hydra's job logging writes <run>/<job>.log; the reason a run failed belongs there too.
        root = logging.getLogger()
        for handler in root.handlers:
            if isinstance(handler, logging.FileHandler):
                handler.emit(logging.LogRecord("gpt_lightning", logging.ERROR, __file__, 0, message, None, None))
                handler.flush()
        sys.exit(EXIT_USER_ERROR)
