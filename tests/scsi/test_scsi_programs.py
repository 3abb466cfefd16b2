"""``iovirt serve --scsi``, ``[[scsi]]`` tables and ``iovirt vhost-user-scsi``, driven by iovirt's own front-end."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from iovirt.vhost_user.driver import VhostUserDriver
from iovirt.vhost_user.messages import ProtocolFeature as PF
from iovirt.vhost_user.specs import SpecError, load_config, parse_scsi, scsi_images
from iovirt.virtio.scsi import defs as d

from scsi_guest import lun_field, make_image

ROOT = Path(__file__).resolve().parents[2]
RESP = d.RESP_CMD_HDR.size + 96


def test_parse_scsi():
    spec = parse_scsi("client:/tmp/s.sock,a.img,b.img,ro,queues=2")
    assert (spec.kind, spec.socket, spec.client, spec.read_only, spec.queues) == ("scsi", "/tmp/s.sock", True, True, 2)
    assert scsi_images(spec) == ["a.img", "b.img"]
    assert not spec.config and parse_scsi("/tmp/s.sock,a.img,config=on").config
    for bad in ("/tmp/s.sock", "/tmp/s.sock,ro", ",a.img", "/tmp/s.sock,a.img,queues=0", "/tmp/s.sock,a.img,x=1"):
        with pytest.raises(SpecError, match="--scsi"):
            parse_scsi(bad)


def test_scsi_toml_table(tmp_path):
    path = tmp_path / "serve.toml"
    path.write_text('[[scsi]]\nsocket = "/tmp/x.sock"\nimages = ["a.img", "b.img"]\nro = true\nqueues = 2\n')
    (spec,) = load_config(str(path))["scsi"]
    assert spec == parse_scsi("/tmp/x.sock,a.img,b.img,ro,queues=2")
    path.write_text('[[scsi]]\nsocket = "/tmp/x.sock"\nimages = "a.img"\n')
    with pytest.raises(SpecError, match="images: want a list"):
        load_config(str(path))


def test_print_capabilities():
    out = subprocess.run([sys.executable, "-m", "iovirt", "vhost-user-scsi", "--print-capabilities"],
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout)["type"] == "scsi"


def _start(args, path):
    proc = subprocess.Popen([sys.executable, "-m", "iovirt", *args], env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 20
    while not os.path.exists(path):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.stderr else ""
        time.sleep(0.05)
    return proc


def _stop(proc):
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    return err


def _command(drv, queue, cdb, lun=0, out=b"", in_len=0):
    header = lun_field(lun) + struct.pack("<QBBB", 1, 0, 0, 0) + cdb.ljust(32, b"\0")
    queue.add_data([header] + ([out] if out else []), [RESP] + ([in_len] if in_len else []))
    drv.kick(2)
    assert drv.frontend.wait_call(2, timeout=5)
    (used,) = queue.get_used()
    sense_len, residual, _q, status, response = d.RESP_CMD_HDR.unpack_from(used.data)
    return response, status, used.data[RESP:], used.data[12 : 12 + sense_len]


def test_serve_scsi_two_luns(tmp_path):
    images = [make_image(tmp_path / "a.img", 2 << 20, b"A" * 512), make_image(tmp_path / "b.img", 1 << 20, b"B" * 512)]
    sock = str(tmp_path / "scsi.sock")
    proc = _start(["serve", "--scsi", f"{sock},{images[0]},{images[1]},config=on"], sock)
    try:
        with VhostUserDriver(sock) as drv:
            assert drv.frontend.get_queue_num() == 3  # controlq, eventq, one request queue
            config = d.CONFIG.unpack(drv.frontend.get_config(0, d.CONFIG.size))
            assert config[0] == 1 and config[5:7] == (96, 32) and config[9] == 1
            queues = drv.start_queues([0, 1, 2], size=32)
            inquiry = bytes([d.INQUIRY, 0, 0, 0, 36, 0])
            response, status, data, _ = _command(drv, queues[2], inquiry, in_len=36)
            assert (response, status, data[8:14]) == (d.VIRTIO_SCSI_S_OK, d.GOOD, b"IOVIRT")
            for lun, fill in ((0, b"A"), (1, b"B")):
                read = struct.pack(">BBIBHB", d.READ_10, 0, 0, 0, 1, 0)
                response, status, data, _ = _command(drv, queues[2], read, lun=lun, in_len=512)
                assert (response, status, data) == (d.VIRTIO_SCSI_S_OK, d.GOOD, fill * 512)
    finally:
        _stop(proc)


def test_vhost_user_scsi_program_offers_config_when_asked(tmp_path):
    image = make_image(tmp_path / "lun0.img", 1 << 20)
    sock = str(tmp_path / "scsi.sock")
    proc = _start(["vhost-user-scsi", "--socket-path", sock, "--offer-config", image], sock)
    try:
        with VhostUserDriver(sock) as drv:
            assert drv.protocol_features & 1 << PF.VHOST_USER_PROTOCOL_F_CONFIG
            config = d.CONFIG.unpack(drv.frontend.get_config(0, d.CONFIG.size))
            assert config[5:7] == (96, 32) and config[9] == 0
    finally:
        _stop(proc)


def test_vhost_user_scsi_program_read_only(tmp_path):
    image = make_image(tmp_path / "ro.img", 1 << 20)
    sock = str(tmp_path / "scsi.sock")
    proc = _start(["vhost-user-scsi", "--socket-path", sock, "--read-only", image], sock)
    try:
        with VhostUserDriver(sock) as drv:
            # QEMU builds the scsi config space itself and warns when CONFIG is offered: off by default.
            assert not drv.protocol_features & 1 << PF.VHOST_USER_PROTOCOL_F_CONFIG
            queues = drv.start_queues([0, 1, 2], size=32)
            write = struct.pack(">BBIBHB", d.WRITE_10, 0, 0, 0, 1, 0)
            response, status, _, sense = _command(drv, queues[2], write, out=b"\xff" * 512)
            assert (response, status, sense[2], sense[12]) == (d.VIRTIO_SCSI_S_OK, d.CHECK_CONDITION,
                                                                d.DATA_PROTECT, 0x27)
    finally:
        err = _stop(proc)
    assert "CHECK CONDITION: write to a read-only LUN" in err
    with open(image, "rb") as f:
        assert f.read(512) == bytes(512)
