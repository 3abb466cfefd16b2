"""The guest's ``/init`` and the shell helpers a guest script may use.

The protocol with the host is a set of marker lines on the serial console
(ttyS0), each alone on its line:

``IOVIRT-INIT-START kernel=<release>``
    ``/init`` is running.
``IOVIRT-INIT-FAILED <reason>``
    a module did not load or an interface could not be configured; the guest
    powers off without running the script.
``IOVIRT-SCRIPT-BEGIN``
    modules are loaded and networking is configured; the script starts.
``IOVIRT-WAIT <token>``
    the script called ``iovirt_wait_host <token>`` and reads the console
    until the host sends ``<token>`` followed by a newline.
``IOVIRT-SCRIPT-END status=<n>``
    the script exited with status ``n``; the guest syncs and powers off.

Networking comes from the kernel command line: ``iovirt.ip=ADDR/LEN``
configures eth0, ``iovirt.ipN=ADDR/LEN`` ethN. The script, if the initramfs
has one at ``/iovirt/script.sh``, is sourced in a subshell after
``/iovirt/lib.sh`` (so ``exit n`` ends it with status ``n``); with no script
a shell reads commands from the console.
"""

from __future__ import annotations

MARK_INIT_START = "IOVIRT-INIT-START"
MARK_INIT_FAILED = "IOVIRT-INIT-FAILED"
MARK_SCRIPT_BEGIN = "IOVIRT-SCRIPT-BEGIN"
MARK_WAIT = "IOVIRT-WAIT"
MARK_SCRIPT_END = "IOVIRT-SCRIPT-END"

#: ``/init``: busybox ash. ``poweroff -f`` makes QEMU exit (ACPI power off),
#: and ``panic=-1`` with ``-no-reboot`` makes it exit if /init itself dies.
INIT = rf"""#!/bin/busybox sh
/bin/busybox --install -s
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp

fail() {{
    echo
    echo "{MARK_INIT_FAILED} $*"
    poweroff -f
}}

echo
echo "{MARK_INIT_START} kernel=$(uname -r)"

while read -r module; do
    insmod "/lib/modules/$module.ko" || fail "insmod $module"
done < /iovirt/modules

ip link set lo up
for param in $(cat /proc/cmdline); do
    case "$param" in
        iovirt.ip=*) iface=eth0 ;;
        iovirt.ip[0-9]*=*) iface="${{param%%=*}}"; iface="eth${{iface#iovirt.ip}}" ;;
        *) continue ;;
    esac
    [ -e "/sys/class/net/$iface" ] || fail "no interface $iface for $param"
    ip addr add "${{param#*=}}" dev "$iface" || fail "ip addr add ${{param#*=}} dev $iface"
    ip link set "$iface" up || fail "ip link set $iface up"
done

echo "{MARK_SCRIPT_BEGIN}"
if [ -f /iovirt/script.sh ]; then
    ( . /iovirt/lib.sh; . /iovirt/script.sh )
else
    ( . /iovirt/lib.sh; exec sh )
fi
status=$?
echo
echo "{MARK_SCRIPT_END} status=$status"
sync
poweroff -f
"""

#: ``/iovirt/lib.sh``: helpers for guest scripts.
LIB = rf"""# iovirt guest helpers (sourced before the script).

# iovirt_wait_ping ADDR [SECONDS]: ping ADDR once a second until it answers
# (the peer guest may still be booting); fails after SECONDS (default 30).
iovirt_wait_ping() {{
    _deadline=$(( $(cut -d. -f1 /proc/uptime) + ${{2:-30}} ))
    while [ "$(cut -d. -f1 /proc/uptime)" -lt "$_deadline" ]; do
        ping -c 1 -W 1 "$1" >/dev/null 2>&1 && return 0
        sleep 0.2
    done
    echo "iovirt_wait_ping: no answer from $1" >&2
    return 1
}}

# iovirt_wait_host TOKEN: tell the host we are waiting, then read console
# lines until the host sends TOKEN (see Guest.release on the host side).
iovirt_wait_host() {{
    echo "{MARK_WAIT} $1"
    while read -r _line; do
        [ "$_line" = "$1" ] && return 0
    done
    return 1
}}
"""
