"""The guest kit's QMP client against a scripted QMP server on a UNIX socket (no QEMU needed)."""

from __future__ import annotations

import json
import socket
import threading

import pytest

from iovirt.guest import Machine, QMPClient, QMPError, QMPTimeout
from iovirt.guest.kernel import GuestKernel

GREETING = {"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0}}, "capabilities": []}}


def serve(path, answers):
    """Accept one client, send the greeting, then answer each command with the next of ``answers``.

    An answer is a list of messages sent in order (events, then the reply).
    Returns the thread and the list of requests it received.
    """
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    received = []

    def run():
        conn, _ = listener.accept()
        with conn, listener:
            conn.sendall(json.dumps(GREETING).encode() + b"\r\n")
            f = conn.makefile("rb")
            for messages in answers:
                line = f.readline()
                if not line:
                    return
                received.append(json.loads(line))
                for m in messages:
                    conn.sendall(json.dumps(m).encode() + b"\r\n")
            f.readline()  # until the client closes

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, received


def test_execute_returns_errors_raise_and_events_are_kept(tmp_path):
    path = tmp_path / "qmp.sock"
    event = {"event": "MIGRATION", "data": {"status": "completed"}, "timestamp": {"seconds": 1, "microseconds": 0}}
    thread, received = serve(path, [
        [{"return": {}}],
        [event, {"return": {"status": "completed", "downtime": 12}}],
        [{"error": {"class": "GenericError", "desc": "no such thing"}}],
    ])
    with QMPClient.connect(path, timeout=5) as qmp:
        assert qmp.greeting == GREETING
        assert qmp.execute("query-migrate") == {"status": "completed", "downtime": 12}
        with pytest.raises(QMPError) as err:
            qmp.execute("migrate-set-parameters", max_bandwidth=1 << 20)
        assert (err.value.error_class, err.value.desc) == ("GenericError", "no such thing")
        # The event that arrived before an answer was kept, and is consumed by wait_event.
        assert qmp.wait_event("MIGRATION", lambda d: d["status"] == "completed", timeout=1) == event
        with pytest.raises(QMPTimeout):
            qmp.wait_event("MIGRATION", timeout=0.2)
    thread.join(5)
    assert [r["execute"] for r in received] == ["qmp_capabilities", "query-migrate", "migrate-set-parameters"]
    assert received[2]["arguments"] == {"max-bandwidth": 1 << 20}  # QMP spells names with '-'


def test_connect_times_out_without_a_server(tmp_path):
    with pytest.raises(QMPTimeout):
        QMPClient.connect(tmp_path / "absent.sock", timeout=0.3)


def test_machine_adds_qmp_and_incoming(tmp_path):
    kernel = GuestKernel(version="x", vmlinuz=tmp_path / "vmlinuz", modules_dir=tmp_path)
    argv = Machine(kernel=kernel, initrd=tmp_path / "i.cpio", qmp_socket=tmp_path / "q,1.sock",
                   incoming="exec:cat /tmp/x.state").argv()
    assert argv[argv.index("-qmp") + 1] == f"unix:{tmp_path}/q,,1.sock,server=on,wait=off"
    assert argv[argv.index("-incoming") + 1] == "exec:cat /tmp/x.state"
    assert "-qmp" not in Machine(kernel=kernel, initrd=tmp_path / "i.cpio").argv()
