"""The one exception type that the CLI turns into a single clear line."""


class CfxError(Exception):
    """A user-facing error: the message names the key, the value and the fix."""


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
