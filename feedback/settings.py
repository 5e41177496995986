"""Settings every Flywheel command reads the same way (environment variables).

Each process builds one settings object; the server, retraining and deploy settings extend
this one, so `DATA_DIR` and `DATABASE_URL` mean the same thing everywhere.
"""

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class StoreSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="", extra="ignore", case_sensitive=False)

    data_dir: Path = Field(
        Path("var"),
        description="Where the embedded PostgreSQL, the converted model and checkpoints live.",
    )
    database_url: str | None = Field(
        None,
        description="An external PostgreSQL (postgresql://...). Unset: an embedded one under DATA_DIR.",
    )
    max_message_chars: int = Field(
        32_000, gt=0, description="Longest message content accepted, in characters."
    )
    max_reason_chars: int = Field(
        2_000, gt=0, description="Longest thumbs reason accepted, in characters."
    )
    max_title_chars: int = Field(200, gt=0, description="Longest conversation title, in characters.")
    db_pool_min: int = Field(1, ge=0, description="Connections the server's pool keeps open.")
    db_pool_max: int = Field(20, gt=0, description="Most connections the server's pool opens.")
