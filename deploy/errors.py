"""Every way deploy refuses or fails: one class per failure, each with a code and an exit code.

`python -m deploy` turns any `DeployError` into `error: MESSAGE` on stderr (with `--json`,
`{"error": err.code, "message": ...}` on stdout) and exits with `err.exit_code`, so both are
part of the public contract (short snake_case codes, never renamed) and the message tells a
person what to change. The exit codes are the ones below, documented in README:

    0 done (or already so) · 1 other failure · 2 usage · 3 not found · 4 refused

Two families share the base, because they are asked different questions:

- the on-disk format (`CheckpointError`): is this directory a complete, untampered checkpoint
  for this base model? Raised by `deploy.checkpoint` and `deploy.loading`, with the path.
- the registry (`RegistryError`): may this change of what serves happen? A format error met on
  the way (a registered checkpoint whose files were altered) becomes `CheckpointUnusable`, a
  refusal that says how to get out of it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from .registry import Checkpoint

EXIT_OK, EXIT_OTHER, EXIT_USAGE, EXIT_NOT_FOUND, EXIT_REFUSED = 0, 1, 2, 3, 4


class DeployError(Exception):
    """Base of every deploy failure; nothing was changed when one is raised."""

    code: ClassVar[str] = "deploy_error"
    exit_code: ClassVar[int] = EXIT_OTHER

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


# ---------------------------------------------------------------------------------------------
# The base model and the checkpoint format.


class BaseModelError(DeployError):
    """The base model cannot be found or prepared; the message says how to fix it."""

    code = "base_model"


class CheckpointError(DeployError):
    """A checkpoint directory cannot be used; subclasses say why, the message how to fix it."""

    code = "checkpoint_error"

    def __init__(self, message: str, *, path: Path | None = None, checkpoint_id: str | None = None):
        super().__init__(message)
        self.path = path
        self.checkpoint_id = checkpoint_id


class CheckpointMissing(CheckpointError):
    """There is no checkpoint at a path (no directory, or no manifest.json in it)."""

    code = "checkpoint_missing"


class CheckpointCorrupt(CheckpointError):
    """The manifest is unreadable, or a file is missing, unlisted or does not match its hash."""

    code = "checkpoint_corrupt"


class CheckpointExists(CheckpointError):
    """Saving would overwrite an existing checkpoint; checkpoints are immutable."""

    code = "checkpoint_exists"


class BaseModelMismatch(CheckpointError):
    """A LoRA adapter was trained on another base model than the one it is loaded onto."""

    code = "base_model_mismatch"


# ---------------------------------------------------------------------------------------------
# The registry: one class per refusal.


class RegistryError(DeployError):
    code = "registry_error"


class NotRegistered(RegistryError):
    """No row of that id in `checkpoints`."""

    code = "not_found"
    exit_code = EXIT_NOT_FOUND

    def __init__(self, checkpoint_id: str, hint: str | None = None) -> None:
        super().__init__(
            f"no checkpoint {checkpoint_id!r} in the registry: "
            + (hint or "`python -m deploy list` shows the registered ones")
        )
        self.checkpoint_id = checkpoint_id


class NoServingPolicy(RegistryError):
    code = "no_serving_policy"

    def __init__(self) -> None:
        super().__init__(
            "nothing is serving: the server registers its base model at start "
            "(or run `python -m deploy promote ID`)"
        )


class Refused(RegistryError):
    """The registry understood the request and will not do it; nothing was changed."""

    code = "refused"
    exit_code = EXIT_REFUSED


class CheckpointRejected(Refused):
    code = "rejected"

    def __init__(self, checkpoint: Checkpoint) -> None:
        super().__init__(
            f"checkpoint {checkpoint.id} was rejected ({checkpoint.reason or 'no reason given'}) "
            "and is never served: train or register a new candidate instead"
        )


class CheckpointUnusable(Refused):
    """A checkpoint's files fail verification (a `CheckpointError` underneath)."""

    code = "corrupt"

    def __init__(self, checkpoint_id: str, path: str, problem: str) -> None:
        # `problem` comes from the format's own error and already says how to fix the directory.
        super().__init__(
            f"checkpoint {checkpoint_id} cannot be used: {problem}. If it cannot be restored, "
            "reject it (`python -m deploy reject ID --reason ...`) and serve another"
        )
        self.path = path


class Pinned(Refused):
    code = "pinned"

    def __init__(self, pinned_id: str, pinned_by: str | None, reason: str | None, what: str) -> None:
        super().__init__(
            f"{what} refused: {pinned_id} is pinned by {pinned_by or 'someone'}"
            + (f" ({reason})" if reason else "")
            + "; automatic changes wait until `python -m deploy unpin`"
        )


class InvalidTransition(Refused):
    code = "invalid_transition"


class NothingToRollBack(Refused):
    code = "nothing_to_roll_back"


class AlreadyRegistered(Refused):
    code = "already_registered"


class InvalidEngineUrl(InvalidTransition):
    code = "invalid_url"
