"""The exceptions a user can act on, and the one line the CLI prints for them."""
from __future__ import annotations

import difflib
import os
import re
import sys
from contextlib import contextmanager


class CfxError(Exception):
    """A user-facing error: the message names the key, the value and the fix."""


class DamagedJob(CfxError):
    """A job folder whose files disagree or are cut (a truncated CSV, a missing or unreadable image): reading
    it would compute on part of it. Exit status 1, as a failed check."""

    exit_code = 1


class Interrupted(Exception):
    """The job was stopped from outside (SIGTERM: a SLURM time limit or pre-emption; SIGINT: Ctrl-C).
    The job folder records ``interrupted``; re-running the same command resumes it."""

    def __init__(self, signal_name: str):
        super().__init__(signal_name)
        self.signal_name = signal_name


class UnreadableItem(CfxError):
    """One dataset item cannot be read (a truncated image, a text file named .png): the job marks that
    sample failed, with the file and the reason, and goes on."""

    def __init__(self, item: str, reason: str, message: str | None = None):
        super().__init__(message or f"cannot read {item}: {reason}")
        self.item, self.reason = item, reason


def debug() -> bool:
    """``cfx --debug`` (or CFX_DEBUG=1): every error in full, none in one line."""
    return os.environ.get("CFX_DEBUG", "").strip() not in ("", "0", "false")


def user_error(exc: BaseException, args: list[str] | None = None) -> str | None:
    """The one-line message of an error a user can fix, or None for a bug (shown in full; with --debug,
    every error is shown in full). ``args``: the command line, where known (``group_option_error``)."""
    from omegaconf.errors import MissingMandatoryValue

    if debug():
        return None
    seen = exc
    while seen is not None:
        if isinstance(seen, CfxError):
            return str(seen)
        if (line := group_option_error(seen, args)) is not None:
            return line
        if (line := unknown_key_error(seen)) is not None:
            return line
        if isinstance(seen, MissingMandatoryValue):
            key = getattr(seen, "full_key", None) or "a key"
            return f"{key} has no value (???): set it on the command line, e.g. {key}=..."
        seen = seen.__cause__ or seen.__context__
    return None


def group_option_error(exc: BaseException, args: list[str] | None = None) -> str | None:
    """``group=option`` naming no config of the group (Hydra's MissingConfigException, whose message runs to
    fifteen lines): one line with the closest option and the choices, or None for any other error.

    The choices are the ones Hydra listed, so they come from its config repository: every folder on the
    search path (``hydra.searchpath``, ``--config-dir``) counts, the packaged conf/ and a user's alike.
    ``args`` (the command line, where known) tells an option typed there from one a config file names."""
    from hydra.errors import MissingConfigException

    if not isinstance(exc, MissingConfigException) or not exc.options or not exc.missing_cfg_file:
        return None
    group, _, option = exc.missing_cfg_file.rpartition("/")
    if not group:
        return None
    options = sorted(exc.options)
    close = difflib.get_close_matches(option, options, n=1)
    return (f"{group}={option}{_named_where(exc, group, option, args)} is not an option of {group}"
            + (f"; did you mean {group}={close[0]}?" if close else "") + f" (choices: {', '.join(options)})")


def unknown_key_error(exc: BaseException) -> str | None:
    """``key=value`` for a key the composed config does not have (Hydra's ConfigCompositionException, six
    lines with the struct error): one line with the closest key of that node, its keys and how to add a key
    on purpose (``+key=value``), or None for any other error."""
    from hydra.errors import ConfigCompositionException

    if not isinstance(exc, ConfigCompositionException) or not str(exc).startswith("Could not override"):
        return None
    cause = exc.__cause__ or exc.__context__
    key, full_key = getattr(cause, "key", None), getattr(cause, "full_key", None)
    node = getattr(cause, "parent_node", None)
    if not isinstance(key, str) or not full_key or node is None or "not in struct" not in str(cause):
        return None
    # Hydra's own hint carries the override as typed ("use +a.b.c=v"); the missing key may be above its last
    # part (trainer.epochs=3 with no trainer)
    added = re.search(r"use \+(\S+)", str(exc))
    override = added.group(1) if added else f"{full_key}=..."
    typed, _, value = override.partition("=")
    keys = sorted(k for k in node.keys() if isinstance(k, str) and not k.startswith("_") and k != "hydra")
    parent = full_key[: -len(key)].rstrip(".")
    close = difflib.get_close_matches(key, keys, n=1)
    where = f"{parent} has no key {key}" if parent else f"{key} is not a key of the config"
    fix = ""
    if close and typed.startswith(full_key):
        fix = f"; did you mean {(parent + '.') if parent else ''}{close[0]}{typed[len(full_key):]}={value}?"
    return (f"{override}: {where}{fix} ({'its' if parent else 'the'} keys: {', '.join(keys)}; "
            f"to add a new key: +{override})")


def _named_where(exc: BaseException, group: str, option: str, args: list[str] | None) -> str:
    """Where the bad option comes from, when not from the command line: " (asked for in experiment/x)"."""
    # Hydra's message starts "In '<parent>':"; overrides (the command line's, and an experiment file's
    # `override /group: ...`) land in the primary config (config, train, hydra/config), a name without a
    # group folder or Hydra's own
    parent = re.match(r"In '([^']+)':", str(exc))
    if parent and "/" in parent.group(1) and not parent.group(1).startswith("hydra/"):
        return f" (asked for in {parent.group(1)})"
    if args is None:
        return ""
    for arg in args:
        key, _, value = arg.partition("=")
        if key.lstrip("+~").split("@")[0] == group and option in re.findall(r"[\w.\-]+", value):
            return ""
    return " (not on the command line: a config file it chose asks for it)"


def override_error(exc: BaseException) -> str | None:
    """Hydra's own message for a bad override (unknown key, syntax), on one line."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(exc, (HydraException, OmegaConfBaseException)):
        return str(exc).strip().splitlines()[0]
    return None


@contextmanager
def one_line_errors(*readers):
    """Inside a command: an error a user can fix (``user_error``, then each of ``readers``) is one line,
    ``cfx: error: ...``, and exit status 2; a bug goes on as its traceback."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 - one line for what a user can fix, a traceback for a bug
        msg = next((m for read in (user_error, *readers) if (m := read(e)) is not None), None)
        if msg is None:
            raise
        print(f"cfx: error: {msg}", file=sys.stderr)
        raise SystemExit(exit_code(e)) from None


def exit_code(exc: BaseException) -> int:
    """The exit status of a one-line error: its CfxError's ``exit_code`` (a damaged job folder: 1), else 2."""
    seen = exc
    while seen is not None:
        if isinstance(seen, CfxError):
            return int(getattr(seen, "exit_code", 2))
        seen = seen.__cause__ or seen.__context__
    return 2
