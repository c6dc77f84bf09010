"""State file: schema versioning, refusal of corrupt and foreign files, log
positions, and batched writes that survive reopening."""
import ipaddress
import sqlite3

import pytest

from policyd.banning import state as state_module
from policyd.errors import HostError
from policyd.banning.state import SCHEMA_VERSION, State


def key(text):
    """A key as bans.py makes them; State treats it as opaque."""
    network = ipaddress.ip_network(text)
    return network.network_address.packed + bytes((network.prefixlen,))


def ban_row(text, expires_at, filter_name="nginx-auth", reason="auto"):
    network = ipaddress.ip_network(text)
    return (key(text), text, network.version, 1.0, expires_at, 5, filter_name, reason)


@pytest.fixture
def db_path(tmp_path):
    return tmp_path / "state.db"


def user_version(db_path):
    """The schema version the file records, read past State."""
    raw = sqlite3.connect(db_path)
    try:
        return raw.execute("PRAGMA user_version").fetchone()[0]
    finally:
        raw.close()


def test_new_file_gets_current_schema_version_wal_and_application_id(db_path):
    State(db_path).close()
    assert SCHEMA_VERSION == len(state_module.MIGRATIONS)
    raw = sqlite3.connect(db_path)
    assert raw.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert raw.execute("PRAGMA application_id").fetchone()[0] == state_module.APPLICATION_ID
    assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    tables = {row[0] for row in raw.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"bans", "ban_history", "failures", "log_positions"} <= tables
    raw.close()


def test_reopening_does_not_rerun_migrations(db_path):
    with State(db_path) as state:
        state.save_position("/var/log/nginx/error.log", {"inode": 7, "offset": 120})
    assert user_version(db_path) == SCHEMA_VERSION
    with State(db_path) as state:
        assert state.load_position("/var/log/nginx/error.log") == {"inode": 7, "offset": 120}


def test_corrupt_file_is_an_input_error_naming_the_file(db_path):
    db_path.write_bytes(b"this is not sqlite at all\n" * 200)
    with pytest.raises(HostError) as caught:
        State(db_path)
    assert str(db_path) in str(caught.value)


def test_damaged_pages_are_an_input_error(db_path):
    with State(db_path) as state:
        with state.transaction() as writer:
            writer.upsert_bans([ban_row(f"192.0.2.{i}/32", 9e9) for i in range(256)]
                               + [ban_row(f"2001:db8:{i:x}::/64", 9e9, "x" * 200) for i in range(2000)])
    raw = sqlite3.connect(db_path)
    raw.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    raw.close()
    data = bytearray(db_path.read_bytes())
    page_size = int.from_bytes(data[16:18], "big")
    assert len(data) > 4 * page_size
    # Overwrite the middle pages (table and index b-trees), keep the header.
    for offset in range(2 * page_size, len(data) - page_size):
        data[offset] = 0xA5
    db_path.write_bytes(bytes(data))
    with pytest.raises(HostError) as caught:
        State(db_path)
    assert str(db_path) in str(caught.value)


def test_foreign_sqlite_database_is_refused_and_left_alone(db_path):
    raw = sqlite3.connect(db_path)
    raw.execute("CREATE TABLE photos (id INTEGER PRIMARY KEY, name TEXT)")
    raw.commit()
    raw.close()
    with pytest.raises(HostError, match="foreign") as caught:
        State(db_path)
    assert str(db_path) in str(caught.value)
    raw = sqlite3.connect(db_path)
    tables = [row[0] for row in raw.execute("SELECT name FROM sqlite_master WHERE type='table'")]
    raw.close()
    assert tables == ["photos"]


def test_newer_schema_is_refused(db_path):
    State(db_path).close()
    raw = sqlite3.connect(db_path)
    raw.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    raw.commit()
    raw.close()
    with pytest.raises(HostError, match="newer"):
        State(db_path)


def test_unopenable_path_is_an_input_error(tmp_path):
    missing = tmp_path / "no-such-dir" / "state.db"
    with pytest.raises(HostError) as caught:
        State(missing)
    assert str(missing) in str(caught.value)


def test_positions_satisfy_the_position_store_protocol(db_path):
    with State(db_path) as state:
        assert state.load("/var/log/caddy/access.log") is None
        state.save("/var/log/caddy/access.log", {"inode": 1, "offset": 10, "head": "abc"})
        state.save("/var/log/caddy/access.log", {"inode": 1, "offset": 99, "head": "abc"})
        assert state.load("/var/log/caddy/access.log") == {"inode": 1, "offset": 99, "head": "abc"}
        assert state.load_position("/var/log/other.log") is None


def test_transaction_rolls_back_entirely_on_error(db_path):
    with State(db_path) as state:
        with pytest.raises(RuntimeError):
            with state.transaction() as writer:
                writer.upsert_bans([ban_row("192.0.2.1/32", 100.0)])
                writer.upsert_history([(key("192.0.2.1/32"), 1, 100.0)])
                raise RuntimeError("interrupted mid-flush")
        assert state.load_bans(now=0.0) == []
        assert state.load_history_of(key("192.0.2.1/32")) is None


def test_loads_filter_by_time(db_path):
    with State(db_path) as state:
        with state.transaction() as writer:
            writer.upsert_bans([ban_row("192.0.2.1/32", 100.0),
                                ban_row("2001:db8::/64", 300.0, None, "manual")])
            writer.add_failures([(key("198.51.100.1"), 10.0, "caddy-auth"),
                                 (key("198.51.100.1"), 50.0, "caddy-auth"),
                                 (key("198.51.100.2"), 40.0, "nginx-auth")])
        assert state.load_bans(now=200.0) == [ban_row("2001:db8::/64", 300.0, None, "manual")]
        assert state.load_failures(since=40.0) == [(key("198.51.100.2"), 40.0, "nginx-auth"),
                                                   (key("198.51.100.1"), 50.0, "caddy-auth")]
        with state.transaction() as writer:
            writer.prune_failures(before=45.0)
        assert state.load_failures(since=0.0) == [(key("198.51.100.1"), 50.0, "caddy-auth")]


def test_history_survives_reopening(db_path):
    with State(db_path) as state:
        with state.transaction() as writer:
            writer.upsert_history([(key("2001:db8:1::/64"), 3, 500.0)])
    with State(db_path) as state:
        assert state.load_history_of(key("2001:db8:1::/64")) == (3, 500.0)


def test_failed_statement_rolls_back_and_the_next_transaction_works(db_path):
    with State(db_path) as state:
        with pytest.raises(sqlite3.IntegrityError):
            with state.transaction() as writer:
                writer.add_failures([(b"k", 1.0, None)])  # filter is NOT NULL
        with state.transaction() as writer:
            writer.add_failures([(b"k", 2.0, "nginx-auth")])
        assert state.load_failures(since=0.0) == [(b"k", 2.0, "nginx-auth")]


def test_failures_up_to_a_networks_last_ban_end_are_not_loaded(db_path):
    with State(db_path) as state:
        with state.transaction() as writer:
            writer.add_failures([(key("198.51.100.3"), 10.0, "nginx-auth"),
                                 (key("198.51.100.3"), 20.0, "nginx-auth"),
                                 (key("198.51.100.3"), 30.0, "nginx-auth"),
                                 (key("198.51.100.4"), 15.0, "nginx-auth")])
            writer.upsert_history([(key("198.51.100.3"), 1, 20.0)])  # its ban ended at 20
        assert state.load_failures(since=0.0) == [(key("198.51.100.4"), 15.0, "nginx-auth"),
                                                  (key("198.51.100.3"), 30.0, "nginx-auth")]


def test_history_rows_of_many_keys_come_in_one_call(db_path):
    with State(db_path) as state:
        rows = [(key(f"2001:db8:{n:x}::/64"), n, float(n)) for n in range(1, 1200)]
        with state.transaction() as writer:
            writer.upsert_history(rows)
        wanted = [row[0] for row in rows[::2]] + [key("192.0.2.99/32")]
        found = state.load_history_of_many(wanted)
        assert found == {row[0]: (row[1], row[2]) for row in rows[::2]}


def test_a_version_1_file_is_upgraded_and_loses_the_index_by_key(db_path):
    raw = sqlite3.connect(db_path)
    raw.executescript(state_module.MIGRATIONS[0])
    raw.execute(f"PRAGMA application_id={state_module.APPLICATION_ID}")
    raw.execute("PRAGMA user_version=1")  # before the fleet (2) and this migration (3)
    raw.execute("INSERT INTO failures VALUES (?, 5.0, 'nginx-auth')", (key("192.0.2.5"),))
    raw.commit()
    raw.close()
    with State(db_path) as state:
        assert user_version(db_path) == SCHEMA_VERSION == 3
        indexes = {row[0] for row in state._read("SELECT name FROM sqlite_master WHERE type = 'index'")}
        assert "failures_by_key" not in indexes and "failures_by_time" in indexes
        assert state.load_failures(since=0.0) == [(key("192.0.2.5"), 5.0, "nginx-auth")]
