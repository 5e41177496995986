"""Deploy's settings: the store's, plus the canary decision and the listener's reconnects.

Every field is an environment variable of the same name in upper case (`CANARY_CONFIDENCE`,
`LISTEN_MAX_BACKOFF_S`, ...), read the same way by every `python -m ...` command.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator

from feedback.settings import StoreSettings


class DeploySettings(StoreSettings):
    # Canary decision (python -m deploy canary-report).
    canary_confidence: float = Field(
        0.95,
        gt=0,
        lt=1,
        description="Confidence level of the Wilson intervals on each version's thumbs-up rate.",
    )
    canary_min_ratings: int = Field(
        30,
        ge=1,
        description="Thumbs each version needs before a canary decision is called decisive.",
    )
    canary_auto: bool = Field(
        False,
        description="canary-report promotes a decisively better canary and aborts a decisively "
        "worse one (never while pinned).",
    )

    # The server's LISTEN connection: reconnects after a database restart with backoff.
    listen_min_backoff_s: float = Field(0.2, gt=0, description="First wait before reconnecting.")
    listen_max_backoff_s: float = Field(
        10.0, gt=0, description="Longest wait between reconnection attempts (doubling up to it)."
    )
    listen_poll_s: float = Field(
        30.0,
        gt=0,
        description="A quiet LISTEN connection re-reads the serving state this often (a safety "
        "net for a silently dead socket or a lost notification).",
    )

    @model_validator(mode="after")
    def _check(self) -> DeploySettings:
        if self.listen_min_backoff_s > self.listen_max_backoff_s:
            raise ValueError("LISTEN_MIN_BACKOFF_S must not exceed LISTEN_MAX_BACKOFF_S")
        return self

    @property
    def checkpoints_dir(self) -> Path:
        """Where retraining writes checkpoint directories."""
        return Path(self.data_dir) / "checkpoints"
