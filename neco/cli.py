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
        print(f"error: {user_message(err)}", file=sys.stderr)
        sys.exit(2)


def user_message(err: BaseException) -> str:
    """The one-line message of ``err``, also when a DataLoader worker raised it.

    PyTorch re-raises a worker's exception in the main process as the same class, but with the worker's whole
    formatted traceback as its message ("Caught X in DataLoader worker process 0. Original Traceback ...");
    the original message is its last line, after the class name.
    """
    text = str(err)
    if "in DataLoader worker process" in text and "Original Traceback" in text:
        last = text.rstrip().splitlines()[-1]
        name, sep, message = last.partition(": ")
        if sep and name.endswith(type(err).__name__):
            return message
    return text
