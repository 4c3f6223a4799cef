"""Errors a user can cause and fix.

Anything raised as an `LMForgeError` is printed by the CLI as one line (no traceback) and the
process exits with status 2. The message must name the file / line / config key at fault and
say what to do about it. Internal bugs stay ordinary exceptions so their tracebacks survive.
"""


class LMForgeError(Exception):
    """Base class of user-facing errors."""


class ConfigError(LMForgeError):
    """A config file or override is wrong (unknown key, wrong type, impossible value)."""


class DataError(LMForgeError):
    """Input data is missing, empty or unreadable."""


class CheckpointError(LMForgeError):
    """A checkpoint is missing, truncated, corrupt or does not match the model."""


class StorageError(LMForgeError):
    """The disk is full, a file size or quota limit was hit, or the run directory is read-only.

    Raised by the write layer (`lmforge.runs`) with the path being written, so the user sees
    "disk full ... while writing runs/x/pretrain/checkpoints/..." instead of an OSError from
    deep inside safetensors or numpy. Writes are atomic, so the previous file is intact.
    """


class RunLockedError(LMForgeError):
    """Another live process is writing to the same run directory (see `runs.run_lock`)."""


class ArtifactError(LMForgeError):
    """A file a finished stage wrote no longer matches the size and hash in its manifest.

    `stage` names the stage whose output is damaged, so `lmforge run` can re-run it and a
    single-stage command can tell the user which one to re-run."""

    def __init__(self, message: str, stage: str | None = None):
        super().__init__(message)
        self.stage = stage
