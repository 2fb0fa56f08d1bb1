"""Error types that carry a message meant for the user.

Every failure caused by input the user controls (a file, a recipe line, a
source) raises a subclass of :class:`LoraforgeError`. The CLI prints its
message as one paragraph without a traceback and exits non-zero; anything else
is a bug in loraforge and keeps its traceback.
"""


class LoraforgeError(Exception):
    """A user-fixable problem; ``str(error)`` is the full explanation."""

    exit_code = 2


class FormatError(LoraforgeError):
    """A file on disk is not what it claims to be (bad safetensors, bad adapter)."""


class RecipeError(LoraforgeError):
    """The recipe is malformed: names the file, line, column and field."""


class PlanError(LoraforgeError):
    """The recipe is well-formed but cannot be built as written."""


class ResolveError(LoraforgeError):
    """An input could not be located, fetched or verified."""


class BuildError(LoraforgeError):
    """A build step failed on valid inputs (disk full, device unavailable)."""


class UsageError(LoraforgeError):
    """A command's arguments cannot be acted on (an unknown choice, a file it would overwrite)."""


class PublishError(LoraforgeError):
    """Publishing to a hub failed or was refused (no token, no permission, a network failure); says what the remote holds."""
