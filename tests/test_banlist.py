"""`policyd bans` as columns (policyd.operator.banlist, policyd.operator.banprint): the same text and
JSON as formatting each ban as an object, from the daemon's book and from the
state file, and a wire answer that refuses what is not one."""
import ipaddress
import json
import random
import sqlite3

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fakes import FakeBanKernel, FakeClock, Settings
from policyd.banning import statefile
from policyd.operator import banlist, banprint, banstate
from policyd.banning.bans import BanManager
from policyd.operator.control import RawPart
from policyd.errors import HostError
from policyd.policy.lists import cidr_text
from policyd.banning.state import State

NOW = 1_800_000_000.25
CAUSES = [(0, None, "manual"), (5, "nginx-auth", "auto"), (3, "fleet:node2", "auto"),
          (7, 'odd "name"\n\u00e9', "auto")]
# Networks whose text is not plain inet_ntop: glibc writes an embedded IPv4 where
# ipaddress writes hex (::1.2.3.4, ::ffff:1.2.3.4), and the IPv4 ones.
SPECIAL = [(6, int(ipaddress.IPv6Address("::ffff:192.0.2.7")), 128),
           (6, int(ipaddress.IPv6Address("::192.0.2.8")), 128),
           (6, int(ipaddress.IPv6Address("::1")), 128),
           (6, int(ipaddress.IPv6Address("2001:db8::")), 64),
           (6, int(ipaddress.IPv6Address("2001:db8:0:0:1::")), 80),
           (4, int(ipaddress.IPv4Address("203.0.113.64")), 28),
           (4, int(ipaddress.IPv4Address("192.0.2.1")), 32)]


def snapshot(count, seed=1, expired=0):
    """[(key, entry)] as BanManager.snapshot() gives it, distinct expiries."""
    rng = random.Random(seed)
    keys = list(SPECIAL)
    while len(keys) < count + expired:
        if rng.random() < 0.5:
            keys.append((4, rng.getrandbits(32), 32))
        else:
            keys.append((6, rng.getrandbits(64) << 64, 64))
    items = []
    for i, key in enumerate(keys[:count + expired]):
        failures, name, reason = rng.choice(CAUSES)
        banned_at = NOW - rng.uniform(0, 3600)
        expires_at = NOW + rng.uniform(0.01, 7200) if i < count else NOW - rng.uniform(0, 60)
        items.append((key, (expires_at, failures, name, reason, banned_at)))
    rng.shuffle(items)
    return items


def old_rows(items, now):
    """What daemons answered before the columns (policyd.daemon.core._ban_rows, verbatim)."""
    rows = sorted(((key, entry) for key, entry in items if entry[0] > now),
                  key=lambda item: (item[1][0], item[0]))
    return [{"network": cidr_text(version, number, prefixlen), "expires_at": expires_at,
             "failures": failures, "filter": filter_name, "reason": reason,
             "banned_at": banned_at, "seconds_left": round(max(0.0, expires_at - now), 1)}
            for (version, number, prefixlen), (expires_at, failures, filter_name, reason,
                                               banned_at) in rows]


def old_text(rows):
    """The text `policyd bans` printed from those rows (the CLI before the columns)."""
    lines = []
    for ban in rows:
        failures, name, reason = ban.get("failures"), ban.get("filter"), ban.get("reason")
        details = " ".join(part for part in (
            None if failures is None else f"failures={failures}",
            None if name is None else f"filter={name}",
            None if reason is None else f"reason={reason}") if part)
        lines.append(f"{ban['network']}\t{ban['seconds_left']}s left\t{details}\n")
    return "".join(lines)


def wire_copy(part):
    """A part as the client reads it: the head through JSON, the bytes as sent."""
    return RawPart(json.loads(json.dumps(part.head)), bytes(part.data))


def over_the_wire(columns):
    return banlist.BanColumns.from_wire(wire_copy(columns.to_wire()))


@pytest.mark.parametrize("count", [0, 1, 7, 300, 12000])
def test_columns_print_exactly_what_the_objects_printed(count):
    items = snapshot(count, seed=count, expired=3)
    rows = json.loads(json.dumps(old_rows(items, NOW)))  # as the CLI received them
    columns = over_the_wire(banlist.from_snapshot(items, NOW, cidr_text))
    assert len(columns) == count
    assert banprint.columns_text(columns) == old_text(rows)
    assert banprint.columns_json(columns) == json.dumps(rows, indent=2, sort_keys=True)


def test_the_rows_answer_is_still_given_to_a_client_that_does_not_ask_for_columns():
    items = snapshot(50)
    assert banlist.rows_from_snapshot(items, NOW, cidr_text) == old_rows(items, NOW)


def test_equal_expiries_keep_the_order_the_bans_were_recorded_in():
    keys = [(4, 3, 32), (4, 1, 32), (4, 2, 32)]
    items = [(key, (NOW + 60, 5, "nginx-auth", "auto", NOW)) for key in keys]
    items.insert(1, ((4, 9, 32), (NOW + 30, 0, None, "manual", NOW)))
    text = banprint.columns_text(over_the_wire(banlist.from_snapshot(items, NOW, cidr_text)))
    assert [line.split("\t")[0] for line in text.splitlines()] == [
        "0.0.0.9/32", "0.0.0.3/32", "0.0.0.1/32", "0.0.0.2/32"]


@given(st.floats(min_value=0.0, max_value=1e9, allow_nan=False))
def test_one_decimal_is_spelled_as_round_then_repr_spelled_it(seconds):
    assert "%.1f" % seconds == repr(round(max(0.0, seconds), 1))


@pytest.mark.parametrize("spoil", [
    lambda h, d: (dict(h, form="columns/1"), d),
    lambda h, d: (dict(h, count=h["count"] + 1), d),
    lambda h, d: (h, d[:-4]),
    lambda h, d: (dict(h, network_bytes=h["network_bytes"] - 1), d),
    lambda h, d: (dict(h, network_bytes="12"), d),
    lambda h, d: (h, d.replace(b"2001:db8::/64", b"2001:db8::\xff64")),
    lambda h, d: (dict(h, causes=h["causes"][:1]), d),
    lambda h, d: (dict(h, causes=[[1, 2]] * 4), d),
    lambda h, d: (h, d[:h["network_bytes"] + 40] + banlist.array.array("d", [float("nan")] * 5)
                  .tobytes() + d[h["network_bytes"] + 80:]),
    lambda h, d: (h, None),
])
def test_a_wire_answer_that_is_not_a_ban_list_is_refused(spoil):
    items = [(key, (NOW + 10 + i, *CAUSES[i % 4][:3], NOW)) for i, key in enumerate(SPECIAL[:5])]
    wire = wire_copy(banlist.from_snapshot(items, NOW, cidr_text).to_wire())
    assert len(banlist.BanColumns.from_wire(wire)) == 5
    head, data = spoil(dict(wire.head), wire.data)
    with pytest.raises((ValueError, TypeError)):
        banlist.BanColumns.from_wire(RawPart(head, data))


def _book(tmp_path, clock):
    state = State(tmp_path / "state.db")
    manager = BanManager(Settings(maxretry=1), state, FakeBanKernel(clock), clock=clock)
    manager.ban("192.0.2.7", 600)
    manager.ban("2001:db8:1::/64", 1200)
    manager.ban("203.0.113.64/28", 60)
    manager.record_failures([(ipaddress.ip_address("2001:db8:2::9"), "nginx-auth", None)])
    manager.record_failures([(ipaddress.ip_address("198.51.100.3"), "caddy-auth", None)])
    manager.flush()
    return state, manager


def _fresh(tmp_path, now, banned_at=True):
    """What the state file lists at `now`, read from its rows (the listing file untouched)."""
    return statefile.read(tmp_path, lambda db: banstate._columns_of(db, now, banned_at), None)


def _rows(tmp_path, now):
    """The same, every field of every row read the plain way."""
    return statefile.read(tmp_path, lambda db: banstate._rows_of(db, now, True), None)


def _printed(columns):
    return banprint.columns_text(columns), banprint.columns_json(columns) if columns.banned_at else None


def test_the_state_file_lists_what_the_daemon_would_list(tmp_path):
    clock = FakeClock(NOW)
    state, manager = _book(tmp_path, clock)
    clock.advance(30)
    daemon = over_the_wire(banlist.from_snapshot(manager.snapshot(), clock(), cidr_text))
    state.close()
    recorded = banstate.from_state(tmp_path, clock())
    assert banprint.columns_json(recorded) == banprint.columns_json(daemon)
    assert banprint.columns_text(banstate.from_state(tmp_path, clock(), banned_at=False)) == (
        banprint.columns_text(daemon))
    assert banstate.count_in_state(tmp_path, clock()) == 5
    clock.advance(60)  # the /28 expired
    assert banstate.count_in_state(tmp_path, clock()) == 4
    assert "203.0.113.64/28" not in banprint.columns_text(banstate.from_state(tmp_path, clock()))


def test_reading_the_state_file_neither_creates_nor_accepts_a_foreign_one(tmp_path):
    assert banstate.from_state(tmp_path, NOW) is None
    assert banstate.count_in_state(tmp_path, NOW) is None
    assert not (tmp_path / "state.db").exists()
    foreign = sqlite3.connect(tmp_path / "state.db")
    foreign.execute("CREATE TABLE bans (x)")
    foreign.commit()
    foreign.close()
    with pytest.raises(HostError, match="foreign"):
        banstate.count_in_state(tmp_path, NOW)
    with pytest.raises(HostError, match="foreign"):
        banstate.from_state(tmp_path, NOW)


def test_a_kernel_listing_prints_network_and_seconds_only():
    rows = [{"network": "192.0.2.7/32", "seconds_left": 42, "expires_at": None,
             "failures": None, "filter": None, "reason": None, "banned_at": None}]
    assert banprint.text(rows) == "192.0.2.7/32\t42s left\t\n"
    assert banprint.as_json(rows) == json.dumps(rows, indent=2, sort_keys=True)


@pytest.mark.parametrize("chunk", [1, 7, 5000])
def test_streamed_parts_print_what_the_whole_list_prints(chunk):
    items = snapshot(300, seed=chunk, expired=5)
    items += [((4, 1000 + i, 32), (NOW + 99.5, 1, "nginx-auth", "auto", NOW)) for i in range(20)]
    rows = json.loads(json.dumps(old_rows(items, NOW)))
    parts = [wire_copy(part)
             for part in banlist.parts_from_snapshot(items, NOW, cidr_text, chunk=chunk)]
    for as_json, expected in ((False, old_text(rows)),
                              (True, json.dumps(rows, indent=2, sort_keys=True) + "\n")):
        out = []
        banprint.write_parts(map(banlist.BanColumns.from_wire, parts), as_json, out.append)
        assert "".join(out) == expected


def test_no_parts_print_an_empty_list():
    for as_json, expected in ((False, ""), (True, "[]\n")):
        out = []
        banprint.write_parts(iter(()), as_json, out.append)
        assert "".join(out) == expected


@pytest.mark.parametrize("odd", ["192.0.2.7/32%s", "192.0.2.7/32\n198.51.100.1", "100%"])
def test_text_of_a_network_spelled_oddly_is_what_one_line_per_ban_gave(odd):
    # The state file is read as it is: a network text with '%' or a newline in it
    # (never written by policyd) must neither break the one-format text nor change it.
    columns = banlist.BanColumns(NOW, ["192.0.2.1/32", odd, "192.0.2.3/32"],
                                 [NOW + 5, NOW + 1, NOW - 3], None, CAUSES[:3], [0, 1, 2])
    expected = "".join(banprint._TEXT_LINE % (columns.network[i], max(0.0, columns.expires_at[i] - NOW),
                                              banprint.details(*CAUSES[i])) for i in (2, 1, 0))
    assert banprint.columns_text(columns) == expected


@pytest.mark.parametrize("numbered", [0, 1, 64])
def test_the_state_file_text_is_the_same_however_many_causes_sqlite_numbers(
        tmp_path, monkeypatch, numbered):
    clock = FakeClock(NOW)
    state, _manager = _book(tmp_path, clock)
    state.close()
    expected = _printed(_rows(tmp_path, clock()))
    monkeypatch.setattr(banstate, "MAX_NUMBERED_CAUSES", numbered)
    assert _printed(_fresh(tmp_path, clock())) == expected
    assert _fresh(tmp_path, clock(), banned_at=False).banned_at is None
    assert banprint.columns_text(_fresh(tmp_path, clock(), banned_at=False)) == expected[0]
    assert len(expected[0].splitlines()) == 5


@pytest.mark.parametrize("odd", [None, "192.0.2.9/32%s", "192.0.2.9/32\n198.51.100.1"])
def test_bans_of_one_cause_read_from_the_state_file_print_what_rows_printed(tmp_path, odd):
    clock = FakeClock(NOW)
    with State(tmp_path / "state.db") as state:
        manager = BanManager(Settings(), state, FakeBanKernel(clock), clock=clock)
        for i in range(700):  # equal expiries, and later ones recorded first
            manager.ban(f"2001:db8:{i}::/64" if i % 3 else f"198.51.100.{i % 250}/32",
                        600 - 7 * (i % 4))
        manager.flush()
    if odd is not None:  # spelled so by hand: the text must not break nor change
        db = sqlite3.connect(tmp_path / "state.db")
        db.execute("UPDATE bans SET network = ? WHERE rowid = 5", (odd,))
        db.commit()
        db.close()
    joined = statefile.read(tmp_path, lambda db: banstate._one_cause_columns_of(db, NOW, (0, None, "manual"), False),
                            None)
    assert (joined is None) == (odd is not None and "\n" in odd)
    rows = _rows(tmp_path, NOW)
    assert rows.causes == [(0, None, "manual")] and len(rows) == 700
    assert _printed(_fresh(tmp_path, NOW)) == _printed(rows)
    assert banprint.columns_text(_fresh(tmp_path, NOW, banned_at=False)) == banprint.columns_text(rows)
    assert banprint.columns_text(rows).count("\n") == 700 + (odd is not None and "\n" in odd)


def test_bans_of_several_causes_are_not_read_as_one(tmp_path):
    clock = FakeClock(NOW)
    state, _manager = _book(tmp_path, clock)
    state.close()
    causes = statefile.read(tmp_path, lambda db: banstate._distinct_causes(db, NOW), None)
    assert len(causes) == 3 and (0, None, "manual") in causes   # 3 manual bans, 2 filters' bans


def wire_text(parts):
    out = []
    banprint.write_parts(map(banlist.BanColumns.from_wire, map(wire_copy, parts)), False, out.append)
    return "".join(out)


def test_a_listing_is_sent_again_while_the_book_keeps_its_stamp(tmp_path):
    clock = FakeClock(NOW)
    state, manager = _book(tmp_path, clock)
    book = manager.book
    first = wire_text(banlist.parts_from_snapshot(dict(book.active), clock(), cidr_text,
                                                  stamp=book.stamp))
    clock.advance(30)
    # Same stamp: the listing kept, only the time moved (and the /28 expired).
    again = wire_text(banlist.parts_from_snapshot({}, clock(), cidr_text, stamp=book.stamp))
    fresh = wire_text(banlist.parts_from_snapshot(dict(book.active), clock(), cidr_text))
    assert again == fresh != first
    clock.advance(60)
    assert "203.0.113.64/28" not in wire_text(
        banlist.parts_from_snapshot({}, clock(), cidr_text, stamp=book.stamp))
    stamp = book.stamp
    manager.ban("198.51.100.77", 600)
    assert book.stamp != stamp
    listed = wire_text(banlist.parts_from_snapshot(dict(book.active), clock(), cidr_text,
                                                   stamp=book.stamp))
    assert "198.51.100.77/32" in listed
    assert listed == wire_text(banlist.parts_from_snapshot(dict(book.active), clock(), cidr_text))
    state.close()


def test_every_change_of_the_book_gives_it_a_new_stamp(tmp_path):
    clock = FakeClock(NOW)
    state, manager = _book(tmp_path, clock)
    book, seen = manager.book, set()

    def changed():
        assert book.stamp not in seen
        seen.add(book.stamp)
    changed()
    manager.ban("198.51.100.8", 60)  # a new ban
    changed()
    manager.ban("198.51.100.8", 600)  # extended
    changed()
    manager.unban("198.51.100.8")  # lifted
    changed()
    manager.record_failures([(ipaddress.ip_address("198.51.100.4"), "nginx-auth", None)])
    changed()  # an automatic ban (maxretry 1)
    clock.advance(3600 * 24)
    manager.expire()
    changed()
    stamp = book.stamp
    assert manager.covering("198.51.100.4") is None and book.stamp == stamp  # reading is no change
    state.close()


@pytest.mark.parametrize("chunk", [3, 5000])
def test_bans_recorded_in_expiry_order_are_listed_as_when_sorted(chunk):
    items = sorted(snapshot(40, seed=chunk, expired=4), key=lambda item: item[1][0])
    rows = json.loads(json.dumps(old_rows(items, NOW)))
    parts = list(banlist.parts_from_snapshot(dict(items), NOW, cidr_text, chunk=chunk))
    assert wire_text(parts) == old_text(rows)
    columns = banlist.from_snapshot(items, NOW, cidr_text)
    assert isinstance(columns.soonest_first(), range)
    assert banprint.columns_json(columns) == json.dumps(rows, indent=2, sort_keys=True)


def test_the_daemon_lists_its_book_as_it_was_when_asked(tmp_path):
    from policyd.daemon.control import ControlAnswers

    class Answers(ControlAnswers):
        def __init__(self, bans, clock):
            self.bans, self.clock = bans, clock

    def listed(answer):
        return wire_text(answer.work().parts)
    clock = FakeClock(NOW)
    state, manager = _book(tmp_path, clock)
    daemon = Answers(manager, clock)
    first = listed(daemon.ban_list(banlist.WIRE))
    asked = daemon.ban_list(banlist.WIRE)  # the book as it is now: the listing kept
    manager.ban("198.51.100.77", 600)
    later = listed(daemon.ban_list(banlist.WIRE))  # a new listing kept instead
    assert listed(asked) == first and "198.51.100.77/32" not in first
    assert "198.51.100.77/32" in later
    assert later == wire_text(banlist.parts_from_snapshot(manager.snapshot(), clock(), cidr_text))
    state.close()


@pytest.mark.parametrize("pieces", [1, 3, 8, 1000])
def test_the_state_file_printed_in_pieces_is_what_printing_it_whole_gives(tmp_path, pieces):
    clock = FakeClock(NOW)
    with State(tmp_path / "state.db") as state:
        manager = BanManager(Settings(maxretry=1), state, FakeBanKernel(clock), clock=clock)
        for i in range(300):
            manager.ban(f"2001:db8:{i}::/64" if i % 3 else f"198.51.100.{i % 250}/32", 600 + i)
        manager.flush()
    for as_json in (False, True):  # the text reads no banned_at (networks joined by SQLite)
        columns = banstate.from_state(tmp_path, NOW, banned_at=as_json)
        whole = banprint.columns_json(columns) + "\n" if as_json else banprint.columns_text(columns)
        out = []
        banprint.write_columns(columns, as_json, out.append, pieces=pieces)
        assert "".join(out) == whole
        assert len(out) > 2 or not 1 < pieces <= 150
        assert sum(map(len, columns.pieces(pieces))) == 300


def test_a_new_listing_spells_only_the_bans_the_last_one_did_not(monkeypatch):
    monkeypatch.setattr(banlist, "_SPELLED", {})
    items = snapshot(3000, seed=7)
    # Some bans gone, some new (among them a ::1.2.3.4 spelled by network_text).
    known = {key for key, _ in items}
    changed = items[100:] + [item for item in snapshot(50, seed=8) if item[0] not in known] + [
        ((6, int(ipaddress.IPv6Address("::198.51.100.9")), 128), items[0][1])]
    few = changed[:500]
    fresh = {name: wire_text(banlist.parts_from_snapshot(book, NOW, cidr_text))
             for name, book in (("items", items), ("changed", changed), ("few", few))}
    spelled = []
    real = banlist._network_texts

    def counting(keys, network_text):
        spelled.extend(keys)
        return real(keys, network_text)
    monkeypatch.setattr(banlist, "_network_texts", counting)

    def listed(book, stamp):
        spelled.clear()
        return wire_text(banlist.parts_from_snapshot(dict(book), NOW, cidr_text, chunk=700,
                                                     stamp=stamp))
    assert listed(items, 1) == fresh["items"] and len(spelled) == 3000
    # The new bans alone are spelled, and the text is what a fresh listing prints.
    assert listed(changed, 2) == fresh["changed"]
    assert set(spelled) == {key for key, _ in changed} - {key for key, _ in items}
    # A book shrunk to under half of what was spelled starts the spellings again.
    assert listed(few, 3) == fresh["few"]
    assert len(banlist._SPELLED) == len(spelled) == 500


def _rows_not_read(monkeypatch):
    def refuse(*_args):
        raise AssertionError("the rows were read again")
    monkeypatch.setattr(banstate, "_columns_of", refuse)


@pytest.mark.parametrize("banned_at", [True, False])
def test_a_second_listing_is_the_listing_file_and_prints_the_same(tmp_path, monkeypatch, banned_at):
    clock = FakeClock(NOW)
    state, _manager = _book(tmp_path, clock)
    state.close()
    first = _printed(banstate.from_state(tmp_path, clock(), banned_at))
    assert (tmp_path / banstate.LISTING_FILE).stat().st_mode & 0o777 == 0o600
    clock.advance(5)
    expected = _printed(_fresh(tmp_path, clock(), banned_at))
    banstate.from_state(tmp_path, clock() - 5, banned_at)   # the file again
    with monkeypatch.context() as patched:
        _rows_not_read(patched)
        again = _printed(banstate.from_state(tmp_path, clock(), banned_at))
        assert again == expected and again[0] != first[0]   # seconds left moved on
        if not banned_at:   # a listing read without banned_at cannot answer --json
            with pytest.raises(AssertionError, match="read again"):
                banstate.from_state(tmp_path, clock(), banned_at=True)


def _ban(manager):
    manager.ban("198.51.100.77", 300)


def _unban(manager):
    manager.unban("192.0.2.7")


def _extend(manager):
    manager.ban("2001:db8:1::/64", 5000)


def _auto(manager):
    manager.record_failures([(ipaddress.ip_address("198.51.100.33"), "caddy-auth", None)])


def _unban_the_last_and_ban_another(manager):
    manager.unban("203.0.113.64/28")
    manager.ban("203.0.113.80/28", 60)


@pytest.mark.parametrize("change", [_ban, _unban, _extend, _auto, _unban_the_last_and_ban_another])
def test_any_change_of_the_bans_reads_the_rows_again(tmp_path, change):
    clock = FakeClock(NOW)
    state, manager = _book(tmp_path, clock)
    banstate.from_state(tmp_path, clock())          # the listing file is written
    clock.advance(1)
    unchanged = _printed(_fresh(tmp_path, clock()))
    change(manager)
    manager.flush()
    state.close()
    listed = _printed(banstate.from_state(tmp_path, clock()))
    assert listed == _printed(_fresh(tmp_path, clock())) and listed != unchanged


def test_bans_that_expired_since_the_listing_are_left_out(tmp_path, monkeypatch):
    clock = FakeClock(NOW)
    state, _manager = _book(tmp_path, clock)
    state.close()
    banstate.from_state(tmp_path, clock())
    clock.advance(90)   # the /28 of 60 s is over
    expected = _printed(_fresh(tmp_path, clock()))
    banstate.from_state(tmp_path, clock() - 90)
    _rows_not_read(monkeypatch)
    listed = banstate.from_state(tmp_path, clock())
    assert _printed(listed) == expected and "203.0.113.64/28" not in _printed(listed)[0]


def test_a_clock_gone_back_reads_the_rows_again(tmp_path, monkeypatch):
    clock = FakeClock(NOW)
    state, _manager = _book(tmp_path, clock)
    state.close()
    banstate.from_state(tmp_path, clock())
    _rows_not_read(monkeypatch)
    with pytest.raises(AssertionError, match="read again"):
        banstate.from_state(tmp_path, clock() - 1)


def _spoiled_data(path):
    record, _newline, data = path.read_bytes().partition(b"\n")
    return record + b"\n" + data[:-3]


def _other_fingerprint(path):
    record, _newline, data = path.read_bytes().partition(b"\n")
    head = json.loads(record)
    head["fingerprint"][0] += 1
    return json.dumps(head).encode() + b"\n" + data


def _more_bans_same_fingerprint(path):
    record, _newline, data = path.read_bytes().partition(b"\n")
    head = json.loads(record)
    head["columns"]["count"] += 1
    return json.dumps(head).encode() + b"\n" + data


@pytest.mark.parametrize("spoil", [
    lambda path: b"", lambda path: b"\n", lambda path: b"[1, 2]\n", lambda path: b"\xff\xfe\n\x00",
    lambda path: path.read_bytes()[:100], _spoiled_data, _other_fingerprint,
    _more_bans_same_fingerprint,
    lambda path: path.read_bytes().replace(b'"banned_at": true', b'"banned_at": 1'),
])
def test_a_listing_file_that_does_not_check_out_is_read_again(tmp_path, spoil):
    clock = FakeClock(NOW)
    state, _manager = _book(tmp_path, clock)
    state.close()
    banstate.from_state(tmp_path, clock())
    listing = tmp_path / banstate.LISTING_FILE
    listing.write_bytes(spoil(listing))
    assert _printed(banstate.from_state(tmp_path, clock())) == _printed(_fresh(tmp_path, clock()))


def test_a_state_dir_that_takes_no_listing_file_still_lists(tmp_path):
    clock = FakeClock(NOW)
    state, _manager = _book(tmp_path, clock)
    state.close()
    expected = _printed(_fresh(tmp_path, clock()))
    (tmp_path / banstate.LISTING_FILE).mkdir()   # the rename over it fails
    for _ in range(2):
        assert _printed(banstate.from_state(tmp_path, clock())) == expected
    assert sorted(path.name for path in tmp_path.iterdir() if "listing" in path.name) == [
        banstate.LISTING_FILE]
