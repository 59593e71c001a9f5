"""What every settings model shares: unknown keys are errors, so a misspelt setting never passes silently.

Each component's settings live beside it (the imagery sources' in ``imagery/``); :mod:`minemap.config` gathers
them into a run's configuration."""

from __future__ import annotations

from pathlib import Path
from typing import Any, get_args

from pydantic import BaseModel, ConfigDict, model_validator


class Section(BaseModel):
    """A table of settings (a TOML table, a stage's options)."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _no_empty_paths(cls, data: Any) -> Any:
        """An empty text for an optional path (``pretrained = ""``) means none, not the current folder."""
        if isinstance(data, dict):
            empty = [k for k, v in data.items() if v == "" and k in cls.model_fields
                     and _optional_path(cls.model_fields[k].annotation)]
            if empty:
                data = {**data, **{k: None for k in empty}}
        return data


def holds_paths(annotation: Any) -> bool:
    """Whether a field's type holds paths: Path, Path | None, list[Path]."""
    return annotation is Path or any(holds_paths(a) for a in get_args(annotation))


def _optional_path(annotation: Any) -> bool:
    return holds_paths(annotation) and type(None) in get_args(annotation)
