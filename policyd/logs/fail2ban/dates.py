"""fail2ban date patterns: find the time in a line, cut it out, turn it into Unix time.

Owns `datepattern` syntax (strptime-like %-fields with fail2ban's %Ex* and %k
extensions, {^LN-BEG}, {UNB}, {DATE}, ** word-bound markers, Epoch, TAI64N)
and the default template list used when a filter names none. A reimplementation
from fail2ban's documentation and behaviour; no fail2ban code is used.
"""
import calendar
import datetime
import re
import time
from _strptime import TimeRE

from policyd.errors import InputError

_LOCALE_RE = TimeRE()
_TZ_ABBREVIATION = r"[A-Z](?:[A-Z]{2,4})?"
FIELDS = {
    "%": "%",
    "a": _LOCALE_RE["a"], "A": _LOCALE_RE["A"], "b": _LOCALE_RE["b"], "B": _LOCALE_RE["B"],
    "p": _LOCALE_RE["p"], "f": r"(?P<f>[0-9]{1,6})", "j": _LOCALE_RE["j"],
    "U": _LOCALE_RE["U"], "W": _LOCALE_RE["W"], "w": _LOCALE_RE["w"],
    "y": r"(?P<y>\d\d)", "I": r"(?P<I>1[0-2]|0[1-9]|[1-9])",
    "d": r"(?P<d>[1-2]\d|[0 ]?[1-9]|3[0-1])",
    "m": r"(?P<m>0?[1-9]|1[0-2])",
    "Y": r"(?P<Y>\d{4})",
    "H": r"(?P<H>[0-1]?\d|2[0-3])",
    "M": r"(?P<M>[0-5]?\d)",
    "S": r"(?P<S>[0-5]?\d|6[0-1])",
    "k": r" ?(?P<H>[0-2]?\d)",
    "l": r" ?(?P<I>1?\d)",
    "Z": r"(?P<Z>Z|[A-Z]{3,5})",
    "z": r"(?P<z>Z|UTC|GMT|[+-][01]\d(?::?\d{2})?)",
    "ExZ": rf"(?P<Z>{_TZ_ABBREVIATION})",
    "Exz": rf"(?P<z>(?:{_TZ_ABBREVIATION})?[+-][01]\d(?::?\d{{2}})?|{_TZ_ABBREVIATION})",
    "Exd": r"(?P<d>[1-2]\d|0[1-9]|3[0-1])",
    "Exm": r"(?P<m>0[1-9]|1[0-2])",
    "ExH": r"(?P<H>[0-1]\d|2[0-3])",
    "Exk": r" ?(?P<H>[0-1]?\d|2[0-3])",
    "Exl": r" ?(?P<I>1[0-2]|\d)",
    "ExM": r"(?P<M>[0-5]\d)",
    "ExS": r"(?P<S>[0-5]\d|6[0-1])",
    # A plausible recent year, so that an arbitrary 4-digit number is no date.
    "ExY": r"(?P<Y>20[0-9]\d)",
    "Exy": r"(?P<y>\d{2})",
}
_FIELD = re.compile(r"%(Ex[a-zA-Z]|[a-zA-Z%])")
_ALPHA_FIELD = re.compile(r"(?<!%)%[aAbBpc]")
_GLOBAL_FLAGS = re.compile(r"((?:^|(?!<\\))\(\?[a-z]+\))")
_HAS_GROUP = re.compile(r"(?<!(?:\(\?))(?<!\\)\((?!\?)")
_WRAP_GROUP = re.compile(r"^((?:\(\?\w+\))?\^?(?:\(\?\w+\))?)(.*?)(\$?)$")
_NO_BOUND_BEGIN = re.compile(r"^\(*(?:\(\?\w+\))?(?:\^|\(*\*\*|\((?:\?:)?\^)")
_NO_BOUND_END = re.compile(r"(?<!\\)(?:\$\)?|\\b|\\s|\*\*\)*)$")
_BOUND_MARKERS = re.compile(r"^\(*(?:\(\?\w+\))?\(*\*\*|(?<!\\)\*\*\)*$")
_STARTS_AT_LINE = re.compile(r"^(?:\(\?\w+\))?(?:\^|\((?:\?:)?\^(?!\|))")
_ENDS_AT_LINE = re.compile(r"(?<![\\|])(?:\$\)?)$")
_EPOCH_FIELD = re.compile(r"(?<!\\)\{L?EPOCH\}", re.IGNORECASE)
_EPOCH = r"\d{10,11}\b(?:\.\d{3,6})?"
_LONG_EPOCH = r"\d{10,11}(?:\d{3}(?:\.\d{1,6}|\d{3})?)?"

DEFAULT_PATTERNS = (
    r"%ExY(?P<_sep>[-/.])%m(?P=_sep)%d(?:T|  ?)%H:%M:%S(?:[.,]%f)?(?:\s*%z)?",
    r"(?:%a )?%b %d %k:%M:%S(?:\.%f)?(?: %ExY)?",
    r"(?:%a )?%b %d %ExY %k:%M:%S(?:\.%f)?",
    r"%d(?P<_sep>[-/])%m(?P=_sep)(?:%ExY|%Exy) %k:%M:%S",
    r"%d(?P<_sep>[-/])%b(?P=_sep)%ExY[ :]?%H:%M:%S(?:\.%f)?(?: %z)?",
    r"%m/%d/%ExY:%H:%M:%S",
    r"%m-%d-%ExY %k:%M:%S(?:\.%f)?",
    "EPOCH",
    r"{^LN-BEG}%H:%M:%S",
    r"^<%m/%d/%Exy@%H:%M:%S>",
    r"%Exy%Exm%Exd  ?%H:%M:%S",
    r"%b %d, %ExY %I:%M:%S %p",
    r"^%b-%d-%Exy %k:%M:%S",
    r"%ExY%Exm%Exd(?:T|  ?)%ExH%ExM%ExS(?:[.,]%f)?(?:\s*%z)?",
    r"(?:%Z )?(?:%a )?%b %d %k:%M:%S(?:\.%f)?(?: %ExY)?",
    r"(?:%z )?(?:%a )?%b %d %k:%M:%S(?:\.%f)?(?: %ExY)?",
    "TAI64N",
)


class Template:
    """One compiled date regex; group 1 is the date text."""

    def __init__(self, name, regex, kind="fields", long_epoch=False, group=1):
        self.name = name
        self.kind = kind              # fields | epoch | tai64n
        self.long_epoch = long_epoch
        self.group = group
        try:
            self.regex = re.compile(regex)
        except re.error as error:
            raise InputError(f"datepattern {name!r} does not compile: {error}",
                             key="datepattern") from None
        self.anchored = bool(_STARTS_AT_LINE.search(regex) or _ENDS_AT_LINE.search(regex))

    def to_time(self, found, now):
        if self.kind == "epoch":
            text = found.group(self.group)
            value = float(text)
            if self.long_epoch and len(text) >= 13:
                value = value / 1000000 if len(text) >= 16 and "." not in text else value / 1000
            return value
        if self.kind == "tai64n":
            return float(int(found.group(1)[2:17], 16))
        return fields_to_time(found.groupdict(), now)


def _bounded(name, regex, word_begin=True, word_end=True):
    """fail2ban's word/line bounds around a date regex; returns (name, regex)."""
    regex = regex.strip()
    flags = _GLOBAL_FLAGS.search(regex)
    if flags:
        regex = _GLOBAL_FLAGS.sub("", regex, count=1)
    bound_begin = word_begin and not _NO_BOUND_BEGIN.search(regex)
    bound_end = word_end and not _NO_BOUND_END.search(regex)
    if not _HAS_GROUP.search(regex):
        regex = _WRAP_GROUP.sub(r"\1(\2)\3", regex)
    if bound_begin:
        if word_begin == "start":
            regex = r"^(?:\W{0,2})?" + regex
            if not name.startswith("{^LN-BEG}"):
                name = "{^LN-BEG}" + name
        else:
            regex = r"(?=^|\b|\W)" + regex
    if bound_end:
        regex += r"(?=\b|\W|$)"
    regex = _BOUND_MARKERS.sub(lambda m: m.group().replace("**", ""), regex)
    if flags:
        regex = flags.group(1) + regex
    return name, regex


def _fields_to_regex(pattern):
    def replace(found):
        key = found.group(1)
        if key not in FIELDS:
            raise InputError(f"datepattern {pattern!r}: unknown field %{key}", key="datepattern")
        return FIELDS[key]
    regex = _FIELD.sub(replace, pattern)
    if _ALPHA_FIELD.search(pattern):
        regex = "(?iu)" + regex
    return regex


def compile_pattern(pattern):
    """One datepattern line -> Template (not {DATE}/{^LN-BEG}/{DEFAULT}; see templates())."""
    key = pattern if "%" in pattern else pattern.upper()
    if "EPOCH" in key:
        if _EPOCH_FIELD.search(pattern):
            long_form = "LEPOCH" in key
            regex = "(" + _EPOCH_FIELD.sub(
                lambda m: f"({_LONG_EPOCH if long_form else _EPOCH})", pattern) + ")"
            return Template(*_bounded(pattern, regex), kind="epoch", long_epoch=long_form, group=2)
        if key in ("EPOCH", "{^LN-BEG}EPOCH", "^EPOCH", "LEPOCH", "{^LN-BEG}LEPOCH", "^LEPOCH"):
            long_form = "LEPOCH" in key
            number = _LONG_EPOCH if long_form else _EPOCH
            if key in ("EPOCH", "LEPOCH"):
                regex = (rf"((?:^|(?P<square>(?<=^\[))|(?P<selinux>(?<=\baudit\()))"
                         rf"{number})(?:(?(selinux)(?=:\d+\)))|(?(square)(?=\])))")
                return Template(*_bounded(key, regex, word_begin=False), kind="epoch",
                                long_epoch=long_form)
            regex = rf"((?P<square>(?<=^\[))?{number})(?(square)(?=\]))"
            return Template(*_bounded(key, regex, word_begin="start"), kind="epoch",
                            long_epoch=long_form)
    if key in ("TAI64N", "{^LN-BEG}TAI64N", "^TAI64N"):
        word_begin = "start" if key != "TAI64N" else False
        return Template(*_bounded("TAI64N", "@[0-9a-f]{24}", word_begin=word_begin), kind="tai64n")
    word_begin = word_end = True
    text = pattern
    if text.startswith("{UNB}"):
        text, word_begin, word_end = text[len("{UNB}"):], False, False
    if word_begin and text.startswith("{^LN-BEG}"):
        text, word_begin = text[len("{^LN-BEG}"):], "start"
    return Template(*_bounded(pattern, _fields_to_regex(text), word_begin, word_end))


def _unbound(pattern):
    for prefix in ("{UNB}", "{^LN-BEG}"):
        if pattern.startswith(prefix):
            pattern = pattern[len(prefix):]
    return pattern


def _defaults():
    """fail2ban's default list: line-anchored variants first, then the originals."""
    anchored, plain = [], []
    for pattern in DEFAULT_PATTERNS:
        template = compile_pattern(pattern)
        if not pattern.startswith(("{^LN-BEG}", "^")):
            anchored.append(compile_pattern("{^LN-BEG}" + pattern))
        plain.append(template)
    return anchored + plain


def templates(datepatterns):
    """The templates for a filter's datepattern lines (none: fail2ban's defaults)."""
    if not datepatterns:
        return _defaults()
    result = []
    for pattern in datepatterns:
        upper = pattern.upper()
        if upper in ("{DEFAULT}", "{^LN-BEG}"):
            chosen = _defaults()
            if upper == "{^LN-BEG}":
                chosen = [t for t in chosen if t.anchored]
            result.extend(chosen)
        elif "{DATE}" in upper:
            for default in DEFAULT_PATTERNS:
                if default in ("EPOCH", "TAI64N"):
                    continue
                wrapped = re.sub(r"(?<!\\)\{DATE\}", lambda _m: _unbound(default), pattern,
                                 flags=re.IGNORECASE)
                result.append(compile_pattern(wrapped))
        elif upper == "{NONE}":
            result.append(Template("{NONE}", r"^()"))
        else:
            result.append(compile_pattern(pattern))
    return result


class DateCutter:
    """Finds the date in a line: (text without the date, Unix time or None)."""

    def __init__(self, datepatterns, now=time.time):
        self.templates = templates(datepatterns)
        self.now = now
        self._last = None
        self._last_clock = None
        self._cached = (None, None, None)

    def cut(self, line):
        """(line without its date, a zero-argument function giving the date's Unix
        time or None): the time is worked out only for lines that turn out to matter."""
        found, template = self._find(line)
        if found is None or found.start(1) == found.end(1):
            # No date here: the last line's, if it is recent (a continuation line).
            previous = self._last_clock
            return line, (lambda: self._recent(previous)) if previous else _no_time
        start, end = found.span(1)
        clock = self._last_clock = lambda: self._time(found, template)
        return line[:start] + line[end:], clock

    def _recent(self, previous):
        when = previous()
        return when if when is not None and when > self.now() - RECENT_SECONDS else None

    def _time(self, found, template):
        text = found.group(1)
        if self._cached[0] == text and self._cached[1] is template:
            return self._cached[2]
        try:
            when = template.to_time(found, self.now())
        except (ValueError, OverflowError, KeyError):
            when = None
        self._cached = (text, template, when)
        return when

    def _find(self, line):
        last = self._last
        if last is not None:
            found = last.regex.search(line)
            if found is not None and (last.anchored or found.start() <= 1):
                return found, last
        best = None
        for template in self.templates:
            found = template.regex.search(line)
            if found is None:
                continue
            if template.anchored or found.start() <= 1:
                best = (found, template)
                break
            if best is None or found.start() < best[0].start():
                best = (found, template)
        if best is None:
            return None, None
        self._last = best[1]
        return best


# Fixed offsets (hours) of the zone names logs commonly carry; no DST switching.
ZONE_HOURS = {
    "Z": 0, "UTC": 0, "GMT": 0, "WET": 0, "WEST": 1, "BST": 1, "CET": 1, "CEST": 2,
    "MET": 1, "MEST": 2, "EET": 2, "EEST": 3, "MSK": 3, "IST": 5.5, "SGT": 8, "HKT": 8,
    "AWST": 8, "CST": -6, "CDT": -5, "EST": -5, "EDT": -4, "MST": -7, "MDT": -6,
    "PST": -8, "PDT": -7, "AKST": -9, "AKDT": -8, "HST": -10, "JST": 9, "KST": 9,
    "ACST": 9.5, "ACDT": 10.5, "AEST": 10, "AEDT": 11, "NZST": 12, "NZDT": 13,
    "BRT": -3, "ART": -3, "AST": -4, "ADT": -3, "NST": -3.5, "NDT": -2.5,
}


# A line without a date takes the previous line's if that is at most this old.
RECENT_SECONDS = 60


def _no_time():
    return None


def _offset_minutes(zone):
    found = re.fullmatch(r"([A-Z]{1,5})?(?:([+-])([01]\d):?(\d{2})?)?", zone)
    if found is None or (found.group(1) and found.group(1) not in ZONE_HOURS):
        raise ValueError(f"unsupported time zone {zone!r}")
    minutes = int(ZONE_HOURS.get(found.group(1) or "Z") * 60)
    if found.group(2):
        offset = int(found.group(3)) * 60 + int(found.group(4) or 0)
        minutes += -offset if found.group(2) == "-" else offset
    return minutes


_MONTHS = {name.lower(): number for number, name in enumerate(calendar.month_abbr) if name}
_MONTHS.update({name.lower(): number for number, name in enumerate(calendar.month_name) if name})


def fields_to_time(fields, now):
    """strptime-like fields -> Unix time; a missing year is the latest one not in the future."""
    current = datetime.datetime.fromtimestamp(now)
    year = month = day = offset = None
    hour = minute = second = 0
    if fields.get("Y"):
        year = int(fields["Y"])
    elif fields.get("y"):
        year = int(fields["y"])
        year += 2000 if year <= 2000 else 0
    if fields.get("m"):
        month = int(fields["m"])
    elif fields.get("b") or fields.get("B"):
        month = _MONTHS[(fields.get("b") or fields.get("B")).lower()]
    if fields.get("d"):
        day = int(fields["d"])
    if fields.get("H"):
        hour = int(fields["H"])
    elif fields.get("I"):
        hour = int(fields["I"]) % 12
        if (fields.get("p") or "").lower() == "pm":
            hour += 12
    minute = int(fields.get("M") or 0)
    second = int(fields.get("S") or 0)
    zone = fields.get("z") or fields.get("Z")
    if zone:
        offset = _offset_minutes(zone)
    assume_year = year is None
    year = current.year if year is None else year
    assume_today = month is None and day is None
    if assume_today:
        month, day = current.month, current.day
    result = datetime.datetime(year, month or 1, day or 1, hour, minute, min(second, 59))
    if offset is not None:
        result -= datetime.timedelta(minutes=offset)
    if assume_today and result > current:
        result -= datetime.timedelta(days=1)
    if assume_year and result > current + datetime.timedelta(days=1):
        result = result.replace(year=year - 1)
    if offset is not None:
        return float(calendar.timegm(result.timetuple()))
    return time.mktime(result.timetuple())
