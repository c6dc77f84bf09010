"""The daemon's list parse in a child process (policyd.policy.listchild): the
daemon gets the same list from the cache the child wrote, never parses a big
list itself unless the child could not, and a bad line still names file:line."""
import pytest

from policyd.errors import InputError
from policyd.policy import listmodel, listparse, lists

BIG = "".join(f"2001:db8:{i >> 16:x}:{i & 0xFFFF:x}::/64\n" for i in range(4000)) + "192.0.2.0/24\n"


@pytest.fixture
def daemon_lists(tmp_path, monkeypatch):
    monkeypatch.setattr(lists, "cache_dir", str(tmp_path / "cache"))
    monkeypatch.setattr(lists, "parse_in_child", True)
    monkeypatch.setattr(lists, "CHILD_PARSE_BYTES", 1024)
    return tmp_path


def test_a_big_list_is_parsed_by_a_child_into_the_cache(daemon_lists, monkeypatch):
    path = daemon_lists / "big.txt"
    path.write_text(BIG)
    expected = lists.parse(path.read_bytes(), str(path))

    def no_parse_here(*_args):
        raise AssertionError("parsed in the daemon")
    monkeypatch.setattr(lists, "parse", no_parse_here)
    netlist = lists.read(str(path))
    assert (netlist.sha256, sorted(netlist.v4), sorted(netlist.v6)) == (
        expected.sha256, sorted(expected.v4), sorted(expected.v6))
    assert netlist.find(__import__("ipaddress").ip_address("2001:db8:0:1::5")) == (
        "2001:db8:0:1::/64", 2)


def test_a_bad_line_in_a_big_list_names_its_file_and_line(daemon_lists):
    path = daemon_lists / "bad.txt"
    path.write_text(BIG + "198.51.100.1/24\n")
    with pytest.raises(InputError, match=r"bad\.txt:4002.*host bits"):
        lists.read(str(path))


def test_without_a_child_the_daemon_parses_itself(daemon_lists, monkeypatch):
    path = daemon_lists / "big.txt"
    path.write_text(BIG)
    monkeypatch.setattr("policyd.policy.listchild.parse_in_child", lambda *_args: False)
    assert len(lists.read(str(path))) == 4001


@pytest.mark.parametrize("data", [
    BIG.encode(),
    b"# header\n192.0.2.0/24 ; SBL1\n\n  203.0.113.0/25\t\r\n2001:db8:1::/48 # x\n",
    b"192.0.2.0/24\n192.0.2.0/24\n192.0.2.0/24 # again\n",
    b"192.0.2.1/32\n::ffff:192.0.2.1\n",
])
def test_a_followed_list_from_the_policys_parse_is_as_read_itself(data, tmp_path):
    """ListSync takes the entries the policy's read already has (the child's parse)
    instead of parsing the file a second time: the same model either way."""
    netlist = lists.parse(data, "/l")
    given = listmodel._Followed("/l", data, netlist)
    itself = listmodel._Followed("/l", data)
    assert (given.raw, given.refs, given.entries) == (itself.raw, itself.refs, itself.entries)


def test_a_followed_list_ignores_a_parse_of_another_version(monkeypatch):
    old = lists.parse(b"192.0.2.0/24\n", "/l")
    monkeypatch.setattr(listparse, "bulk", lambda _data: None)  # the line-by-line reading
    followed = listmodel._Followed("/l", b"198.51.100.0/24\n", old)
    assert set(followed.entries) == {b"198.51.100.0/24"}


def test_a_child_past_its_time_is_ended_and_the_daemon_parses_itself(daemon_lists, monkeypatch):
    from policyd.policy import listchild
    path = daemon_lists / "big.txt"
    path.write_text(BIG)
    monkeypatch.setattr(listchild, "TIMEOUT_SECONDS", 0)
    assert listchild.parse_in_child(str(path), str(daemon_lists / "cache")) is False
    assert not (daemon_lists / "cache").exists()  # it never got to write
    assert len(lists.read(str(path))) == 4001


def test_the_child_never_runs_code_from_the_daemons_working_directory(tmp_path, monkeypatch):
    # `python3 -m` puts the working directory first on sys.path: a daemon started
    # from a directory others can write (/tmp) would run their policyd package.
    from policyd.policy import listchild
    planted = tmp_path / "cwd" / "policyd" / "policy"
    planted.mkdir(parents=True)
    marker = tmp_path / "ran"
    for folder in (planted.parent, planted):
        (folder / "__init__.py").write_text("")
    (planted / "listchild.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    path = tmp_path / "big.txt"
    path.write_text(BIG)
    monkeypatch.chdir(tmp_path / "cwd")
    assert listchild.parse_in_child(str(path), str(tmp_path / "cache"))
    assert not marker.exists()
