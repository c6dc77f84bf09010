"""The time a log line carries, as Unix seconds.

Owns the time formats filters name (`time_format`): a strptime format (a time
without a zone is local time, as nginx, Apache, HAProxy and oauth2-proxy write
it), `unix` (seconds, Caddy's `ts`) or `rfc3339` (Traefik, Authelia).
"""
# datetime is imported where a time is parsed: test-filter never parses one,
# and the import is a few ms of its start-up.

SPECIAL_FORMATS = ("unix", "rfc3339")
_CACHE_LIMIT = 4096


class TimeParser:
    """Turns the text (or JSON number) of one time field into Unix seconds, or None."""

    def __init__(self, time_format):
        self.format = time_format
        self._cache = {}
        self.texts = {}    # the raw field as written -> seconds (read by policyd.logs.filters)
        # Lines of one minute differ only in their seconds: parse the minute once.
        self._by_minute = time_format.endswith(":%S")

    def __call__(self, raw):
        # A burst of lines carries the same few texts: one dict lookup for those
        # (and one float object, shared by every failure of that second).
        hashable = isinstance(raw, (bytes, str))
        when = self.texts.get(raw) if hashable else None
        if when is None:
            when = self._uncached(raw)
            if hashable and when is not None:
                if len(self.texts) >= _CACHE_LIMIT:
                    self.texts.clear()
                self.texts[raw] = when
        return when

    def _uncached(self, raw):
        if isinstance(raw, bytes):
            try:
                raw = raw.decode("ascii")
            except UnicodeDecodeError:
                return None
        if self._by_minute and isinstance(raw, str) and len(raw) > 3 and raw[-3] == ":" \
                and raw[-2:].isdigit() and raw[-2:] < "60":
            minute = self._cached(raw[:-3] + ":00")
            return minute + int(raw[-2:]) if minute is not None else None
        return self._cached(raw)

    def _cached(self, raw):
        # Failures from one burst share their second: parse each text once.
        when = self._cache.get(raw) if isinstance(raw, str) else None
        if when is None:
            when = self._parse(raw)
            if isinstance(raw, str):
                if len(self._cache) >= _CACHE_LIMIT:
                    self._cache.clear()
                self._cache[raw] = when
        return when

    def _parse(self, raw):
        from datetime import datetime
        try:
            if self.format == "unix":
                if isinstance(raw, bool):
                    return None
                when = float(raw)
            elif not isinstance(raw, str):
                return None
            elif self.format == "rfc3339":
                when = datetime.fromisoformat(raw.replace("Z", "+00:00").replace("z", "+00:00")).timestamp()
            else:
                when = datetime.strptime(raw, self.format).timestamp()
        except (ValueError, TypeError, OverflowError, OSError):
            return None
        return when if when == when and abs(when) < 1e11 else None  # not NaN, not absurd


def valid_format(time_format):
    """An error message for a time_format that cannot work, else None."""
    if time_format in SPECIAL_FORMATS:
        return None
    if "%" not in time_format:
        return f"must be {' or '.join(SPECIAL_FORMATS)} or a strptime format"
    from datetime import datetime
    try:
        datetime.now().strftime(time_format)
    except ValueError as error:
        return f"bad strptime format: {error}"
    return None
