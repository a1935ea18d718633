"""The one rule by which jobctl and jobcore.libvirt reach the jobd of the default run
directory (jobcore.protocol.resolve_default_daemon): a plain ``qemu:///…``/``sim:///…``
URI goes to jobd when its socket answers, anything else is used as it is."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from jobd_helpers import BACKUP_VDB, Jobd, jobctl

from jobcore.errors import InvalidURI
from jobcore.libvirt.objects import resolve_uri
from jobcore.protocol import RO_SOCKET, RW_SOCKET, default_run_dir, resolve_default_daemon


@pytest.fixture
def xdg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "xdg"
    path.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(path))
    return path


@pytest.fixture
def listening(xdg: Path) -> Iterator[Path]:
    """Both sockets of the default run directory accept connections."""
    run = default_run_dir()
    run.mkdir(mode=0o700)
    socks = []
    for name in (RW_SOCKET, RO_SOCKET):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(run / name))
        sock.listen(8)
        socks.append(sock)
    yield run
    for sock in socks:
        sock.close()


def test_no_jobd_leaves_every_uri_in_process(xdg: Path) -> None:
    assert resolve_default_daemon("qemu:///session") == ("qemu:///session", False)
    assert resolve_default_daemon("sim:///default?rate=0") == ("sim:///default?rate=0", False)


def test_a_stale_socket_file_is_no_jobd(xdg: Path) -> None:
    run = default_run_dir()
    run.mkdir(mode=0o700)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(run / RW_SOCKET))
    stale.close()  # the file stays, nobody listens
    assert resolve_default_daemon("sim:///default") == ("sim:///default", False)


def test_plain_uris_reach_the_answering_jobd(listening: Path) -> None:
    rw, ro = listening / RW_SOCKET, listening / RO_SOCKET
    assert resolve_default_daemon("qemu:///session") == (
        f"qemu+unix:///session?socket={str(rw).replace('/', '%2F')}",
        True,
    )
    uri, via = resolve_default_daemon("sim:///h1?rate=0", readonly=True)
    assert via and uri == f"sim+unix:///h1?rate=0&socket={str(ro).replace('/', '%2F')}"
    # jobcore.libvirt follows the same rule
    assert resolve_uri("sim:///h1?rate=0", True) == (uri, True)


def test_other_uris_are_used_as_they_are(listening: Path) -> None:
    given = "sim+unix:///default?socket=/elsewhere/jobd.sock"
    assert resolve_default_daemon(given) == (given, True)
    assert resolve_default_daemon("acme:///x") == ("acme:///x", False)
    with pytest.raises(InvalidURI):
        resolve_default_daemon("no-scheme")


def test_jobctl_with_a_plain_uri_reaches_the_default_jobd(tmp_path: Path, xdg: Path) -> None:
    """``jobctl -c sim:///default`` and ``-c qemu:///session`` use the default run
    directory's jobd, as jobcore.libvirt does, rather than an in-process driver (for qemu,
    one that refused: "run directory … is in use by another qemu driver connection")."""
    env = {"XDG_RUNTIME_DIR": str(xdg)}
    (tmp_path / "job.xml").write_text(BACKUP_VDB.format(tag="dd"))
    with Jobd(xdg / "jobcore", env={"XDG_RUNTIME_DIR": str(xdg)}) as jobd:
        jobd.wait_ready()
        begun = jobctl(jobd.uri("rate=1"), "begin", "vm1", str(tmp_path / "job.xml"), env=env)
        assert begun.returncode == 0, begun.stderr
        job = begun.stdout.split()[0]
        listed = jobctl("sim:///default", "list", env=env)
        assert listed.returncode == 0, listed.stderr
        assert job in listed.stdout
        domains = jobctl("qemu:///session", "domains", env=env)
        assert domains.returncode == 0, domains.stderr
        assert "in use" not in domains.stderr
