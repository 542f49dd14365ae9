"""The exception types a user of the engine, the batch command or the service can meet.

Every message says what was wrong and what to do next; none of them should ever reach an artist as a traceback.
"""


class OAVMError(Exception):
    """Base class of every error OAVM raises on purpose."""


class OAVMInputError(OAVMError, ValueError):
    """A frame, mask, object id or argument that the engine cannot use (wrong size, dtype, NaN, empty mask...)."""


class CheckpointError(OAVMError):
    """A checkpoint file that is missing, corrupt, of another format version or of another model config."""
