"""What every settings model shares: unknown keys are errors, so a misspelt setting never passes silently.

Each component's settings live beside it (the imagery sources' in ``imagery/``); :mod:`minemap.config` gathers
them into a run's configuration."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """A table of settings (a TOML table, a stage's options)."""

    model_config = ConfigDict(extra="forbid")
