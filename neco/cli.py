"""What every command-line entry point does with an error the user can fix: one line on stderr, exit status 2."""

from __future__ import annotations

import contextlib
import sys

from omegaconf.errors import MissingMandatoryValue

from neco.errors import UserError

# Errors whose message already names the setting to change: printed as they are, without a traceback.
# Named by module so that importing this file does not import torch: `--help` and config errors must answer
# before the heavy modules load, and an error class whose module was never imported cannot have been raised.
_USER_ERROR_CLASSES = (
    ("neco.models.weights", "WeightsError"),
    ("neco.data.datasets", "DatasetNotFound"),
    ("neco.data.multicrop", "CropSamplingError"),
)


def user_error_types() -> tuple[type[BaseException], ...]:
    """UserError and the error classes of the already imported modules that report user mistakes."""
    types: list[type[BaseException]] = [UserError]
    for module, name in _USER_ERROR_CLASSES:
        loaded = sys.modules.get(module)
        if loaded is not None and hasattr(loaded, name):
            types.append(getattr(loaded, name))
    return tuple(types)


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
    except Exception as err:
        if not isinstance(err, user_error_types()):
            raise
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
