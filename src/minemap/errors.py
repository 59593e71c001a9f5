"""Exception family of minemap.

Every error a user can cause (a wrong path, an empty file, a missing band) is raised as a subclass of
:class:`MinemapError` at the boundary where it is first seen, with the file and the problem in one sentence.
The CLI prints that sentence and exits with code 2.
"""

from __future__ import annotations


class MinemapError(Exception):
    """Base of all errors that minemap reports to a user."""


class InputError(MinemapError):
    """A user-supplied file, value or configuration is missing or malformed."""


class ImageryError(MinemapError):
    """Imagery cannot be found, read, or does not fit the request (years, bands, resolution)."""


class ModelError(MinemapError):
    """A model directory, checkpoint or model card is missing, corrupt or incompatible."""


class ExecutionError(MinemapError):
    """A cluster that cannot be reached, or a unit of work whose workers kept dying."""


class OutputError(MinemapError):
    """An output path that minemap may not write: a folder holding files it did not write, or a file where a
    folder belongs. minemap never replaces or deletes what it did not write."""
