"""What the remote sources (STAC, Planet) share: where they cache, and how they retry HTTP requests."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

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


def month_spec(v: Any) -> Any:
    """'6-11' (or '11-2', across the new year) -> a list of months; lists pass."""
    if isinstance(v, str):
        m = re.fullmatch(r"\s*(\d{1,2})\s*-\s*(\d{1,2})\s*", v)
        if not m:
            raise ValueError(f"months {v!r}: expected e.g. '6-11' or a list of months")
        a, b = int(m.group(1)), int(m.group(2))
        return list(range(a, b + 1)) if a <= b else list(range(a, 13)) + list(range(1, b + 1))
    return v


def check_months(v: list[int]) -> list[int]:
    if not v or any(not 1 <= m <= 12 for m in v):
        raise ValueError("months must be 1-12")
    return sorted(set(v))


def public_url(url: str) -> str:
    """``url`` without its query string, fragment and user:password: signed asset addresses (SAS tokens,
    pre-signed S3 links, API keys) carry their secret there, and an error message or a log keeps no secret."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(str(url))
    if not parts.scheme or not parts.netloc:
        return re.split(r"[?#]", str(url), maxsplit=1)[0]
    return urlunsplit((parts.scheme, parts.netloc.rsplit("@", 1)[-1], parts.path, "", ""))
