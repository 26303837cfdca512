"""The one exception type that the CLI turns into a single clear line."""


class CfxError(Exception):
    """A user-facing error: the message names the key, the value and the fix."""
