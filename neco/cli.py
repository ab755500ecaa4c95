"""What every command-line entry point does with an error the user can fix: one line on stderr, exit status 2."""

from __future__ import annotations

import argparse
import contextlib
import functools
import sys

from hydra._internal.utils import get_args_parser
from omegaconf.errors import MissingMandatoryValue

from neco.errors import UserError
from neco.overrides import check_overrides

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


def checked_command_line(schema: type, open_type=None):
    """Decorate a ``hydra.main`` entry point so that its command-line overrides are checked against ``schema``
    and the config groups (:func:`neco.overrides.check_overrides`) before Hydra composes: an unknown key, also
    one added with ``+`` or ``++``, or an unknown group option is one line with the closest names, exit 2.
    A wrong choice value is one line with the valid ones; ``open_type(key)`` types keys below open nodes."""

    def decorate(hydra_main):
        @functools.wraps(hydra_main)
        def entry(*args, **kwargs):
            if not args and not kwargs:  # run as a program: Hydra reads sys.argv
                _check_argv(sys.argv[1:], schema, open_type)
            return hydra_main(*args, **kwargs)

        return entry

    return decorate


def _check_argv(argv: list[str], schema: type, open_type=None) -> None:
    parser = get_args_parser()  # Hydra's own command-line parser, so flags and overrides split as Hydra does
    parser.exit_on_error = False
    try:
        args, _ = parser.parse_known_args(argv)
    except (argparse.ArgumentError, SystemExit):
        return  # Hydra reports a malformed command line itself
    if args.help or args.hydra_help or args.shell_completion or args.info or args.config_name or args.config_path:
        return
    # Another config directory or search path may hold more group options than conf/ does.
    extra_search_path = args.config_dir is not None or any("hydra.searchpath" in o for o in args.overrides)
    with exit_on_user_error():
        check_overrides(args.overrides, schema, check_groups=not extra_search_path, open_type=open_type)
