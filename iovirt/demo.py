"""The demo behind ``make demo``: real guests whose virtio devices are served by iovirt.

It starts ``iovirt serve`` with two virtio-net ports (joined by iovirt's
learning switch) and a virtio-blk device on a fresh raw image, boots two
Linux guests under QEMU against those sockets, and shows:

1. guest A pinging guest B through iovirt's switch;
2. guest A reading the disk (md5 equal to the host's), writing a line to it
   and syncing; the host then finds that line in the image file.

    python -m iovirt.demo [--workdir DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
from pathlib import Path

from iovirt.guest import Guest, VhostUserBlk, VhostUserNet
from iovirt.serve_process import ServeProcess

IMAGE_SIZE = 32 << 20
MESSAGE = "written by a Linux guest through the iovirt virtio-blk backend"
MESSAGE_OFFSET = 1 << 20


def run(workdir: Path) -> int:
    """Run the demo in ``workdir``; returns a process exit code."""
    net = [workdir / "net0.sock", workdir / "net1.sock"]
    blk = workdir / "blk0.sock"
    image = workdir / "disk.img"
    image.write_bytes(os.urandom(IMAGE_SIZE))
    host_md5 = hashlib.md5(image.read_bytes()).hexdigest()
    args = ["--net", str(net[0]), "--net", str(net[1]), "--blk", f"{blk},{image}"]
    print(f"$ iovirt serve {' '.join(args)}")
    script_a = f"""set -e
echo "== guest A: eth0 and the disk served by iovirt"
ip -4 addr show eth0 | grep inet
echo "== guest A: ping guest B through iovirt's switch"
ping -c 4 -W 10 10.77.0.2
echo "== guest A: md5 of /dev/vda"
md5sum /dev/vda
echo "== guest A: writing a line at offset {MESSAGE_OFFSET} and syncing"
printf '%s' '{MESSAGE}' | dd of=/dev/vda bs=512 seek={MESSAGE_OFFSET // 512} conv=notrunc 2>/dev/null
sync
"""
    with ServeProcess(args, workdir / "iovirt-serve.log", [*net, blk]) as serve:
        a = Guest(workdir, [VhostUserNet(net[0], ip="10.77.0.1/24"), VhostUserBlk(blk)], name="guest-a", script=script_a)
        b = Guest(workdir, [VhostUserNet(net[1], ip="10.77.0.2/24")], name="guest-b", script="iovirt_wait_host done")
        with a, b:
            print("booting guest B (10.77.0.2) and guest A (10.77.0.1) under QEMU/TCG ...")
            b.start()
            a.start()
            result = a.wait_result(timeout=180)
            b.release("done", timeout=60)
            b.wait_result(timeout=60)
        print(result.output.rstrip())
        print(f"== guest A booted to its script in {result.boot_seconds:.1f} s, exit status {result.status}")
        print("== iovirt's log (negotiation):")
        for line in serve.log().splitlines():
            if "negotiated features" in line or "connected" in line:
                print("   " + line.split(" ", 2)[-1])
    found = image.read_bytes()[MESSAGE_OFFSET : MESSAGE_OFFSET + len(MESSAGE)].decode(errors="replace")
    ok_md5 = host_md5 in result.output
    ok_ping = " 0% packet loss" in result.output
    ok_write = found == MESSAGE
    print("== summary")
    print(f"   ping guest A -> guest B through iovirt: {'OK' if ok_ping else 'FAILED'}")
    print(f"   guest md5 of the disk equals the host's ({host_md5}): {'OK' if ok_md5 else 'FAILED'}")
    print(f"   host reads the guest's line back from {image.name}: {found!r} {'OK' if ok_write else 'FAILED'}")
    return 0 if result.status == 0 and ok_md5 and ok_ping and ok_write else 1


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m iovirt.demo``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, help="where sockets, image and logs go (default: a temporary dir)")
    args = parser.parse_args(argv)
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
        return run(args.workdir)
    with tempfile.TemporaryDirectory(prefix="iovirt-demo-") as tmp:
        return run(Path(tmp))


if __name__ == "__main__":
    sys.exit(main())
