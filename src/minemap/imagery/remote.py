"""What the remote sources (STAC, Planet) share: where they cache, and how they retry HTTP requests."""

from __future__ import annotations

import os
from pathlib import Path

RETRY_STATUS = (429, 500, 502, 503, 504)


def cache_root(cache_dir: Path | str | None) -> Path:
    """The cache folder: ``cache_dir`` where given, else ``$MINEMAP_CACHE``, else ``~/.cache/minemap``."""
    if cache_dir is not None:
        return Path(cache_dir)
    return Path(os.environ.get("MINEMAP_CACHE") or Path.home() / ".cache" / "minemap")


def retry_policy(retries: int):
    """urllib3's retry policy of both sources: ``retries`` tries with exponential backoff on connection errors and
    on :data:`RETRY_STATUS` (honouring Retry-After), any method, the last response returned, not raised."""
    from urllib3 import Retry

    return Retry(total=retries, backoff_factor=0.5, status_forcelist=RETRY_STATUS, allowed_methods=None,
                 respect_retry_after_header=True, raise_on_status=False)
