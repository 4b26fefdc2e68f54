"""Images given as http(s) URLs: fetched in the data-loader workers, with a timeout and retries.

An image cell holding a string that starts with ``http://`` or ``https://`` (Pick-a-Pic v1's ``image_0_url``, a
LAION-style ``url`` column...) is downloaded when its pair is loaded, in the data-loader worker that loads it, so the
training process never waits on the network while workers have batches ready. Each attempt has a timeout (on the
connection and on every read); a failed attempt (a timeout, a refused connection, an HTTP error status) is retried
after a pause that doubles each time: attempt ``k`` (from 0) waits ``backoff · 2^(k-1)`` seconds before it starts.

A URL that still fails after the last retry is an *unreachable image*: a `UnreachableImageError` (a `ValueError`)
naming the row, the column and the URL, or, with ``skip_unreachable_urls`` (or ``skip_invalid_rows``), a skipped pair,
logged with its row and column and counted in ``data/skipped_rows``.

HTTP status codes that a retry cannot fix (400, 401, 403, 404, 410) fail at once, without retries.
"""

import time
import urllib.error
import urllib.request
from dataclasses import dataclass


URL_PREFIXES = ("http://", "https://")
# Client errors that a retry will not fix: fail at once
_PERMANENT_STATUS = frozenset({400, 401, 403, 404, 410})
_USER_AGENT = "trl_diffusion (image preference data loader)"


class UnreachableImageError(ValueError):
    """An image URL that could not be fetched after every retry (its message names the row, column and URL)."""


@dataclass(frozen=True)
class ImageURLOptions:
    """How image URLs are fetched (see the module docstring).

    Args:
        timeout: seconds each attempt may wait for the connection and for each read.
        retries: attempts after the first one.
        backoff: seconds before the first retry; each further retry waits twice as long as the one before.
        skip_unreachable: skip (and count) a pair whose image URL stays unreachable instead of raising.
    """

    timeout: float = 10.0
    retries: int = 3
    backoff: float = 1.0
    skip_unreachable: bool = False

    def __post_init__(self):
        if self.timeout <= 0:
            raise ValueError(f"image_url_timeout must be positive, got {self.timeout}.")
        if self.retries < 0:
            raise ValueError(f"image_url_retries must be at least 0, got {self.retries}.")
        if self.backoff < 0:
            raise ValueError(f"image_url_backoff must be at least 0, got {self.backoff}.")

    @classmethod
    def from_config(cls, args) -> "ImageURLOptions":
        """The options of a trainer config (`DiffusionPreferenceConfig`)."""
        return cls(
            timeout=args.image_url_timeout,
            retries=args.image_url_retries,
            backoff=args.image_url_backoff,
            skip_unreachable=args.skip_unreachable_urls,
        )


def is_url(value) -> bool:
    """Whether an image cell is an http(s) URL."""
    return isinstance(value, str) and value.startswith(URL_PREFIXES)


def fetch_url(url: str, options: ImageURLOptions, row, column: str) -> bytes:
    """The bytes at ``url``, with ``options.retries`` retries; raise an `UnreachableImageError` naming the row and
    column when every attempt fails."""
    failures = []
    for attempt in range(options.retries + 1):
        if attempt:
            time.sleep(options.backoff * 2 ** (attempt - 1))
        try:
            request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
            with urllib.request.urlopen(request, timeout=options.timeout) as response:
                return response.read()
        except urllib.error.HTTPError as error:
            failures.append(f"HTTP {error.code}")
            if error.code in _PERMANENT_STATUS:
                break
        except (OSError, ValueError) as error:  # URLError, timeouts, reset connections, malformed URLs
            failures.append(_describe(error))
    raise UnreachableImageError(
        f"Row {row}, column {column!r}: unreachable image URL {url!r:.200} after {len(failures)} attempt(s) "
        f"({'; '.join(failures)}; timeout {options.timeout} s). Pass skip_unreachable_urls=True to skip such pairs."
    )


def _describe(error: Exception) -> str:
    reason = getattr(error, "reason", None)
    if isinstance(error, TimeoutError) or isinstance(reason, TimeoutError):
        return "timed out"
    return f"{type(error).__name__}: {reason if reason is not None else error}"
