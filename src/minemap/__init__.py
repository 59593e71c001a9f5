"""minemap: map mining areas in satellite imagery, year after year, as a panel dataset.

The Python API mirrors the CLI: one function per pipeline stage, each reading and writing documented files.
"""

from minemap.errors import ImageryError, InputError, MinemapError, ModelError

__version__ = "0.1.0"

__all__ = ["ImageryError", "InputError", "MinemapError", "ModelError", "__version__"]
