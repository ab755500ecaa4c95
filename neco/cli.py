"""What every command-line entry point does with an error the user can fix: one line on stderr, exit status 2."""

from __future__ import annotations

import contextlib
import sys

from omegaconf.errors import MissingMandatoryValue

from neco.data.datasets import DatasetNotFound
from neco.data.multicrop import CropSamplingError
from neco.errors import UserError
from neco.models.weights import WeightsError

# Errors whose message already names the setting to change: printed as they are, without a traceback.
USER_ERRORS = (UserError, WeightsError, DatasetNotFound, CropSamplingError)


@contextlib.contextmanager
def exit_on_user_error(context: str = " for this configuration", example: str = "/path/to/file"):
    """Turn a user error raised inside the block into ``error: <message>`` and exit 2.

    A mandatory value left unset (``???`` in a config) is named with an example: ``<key> must be set<context>
    (e.g. <key>=<example>)``.
    """
    try:
        yield
    except MissingMandatoryValue as err:
        print(f"error: {err.full_key} must be set{context} (e.g. {err.full_key}={example})", file=sys.stderr)
        sys.exit(2)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
