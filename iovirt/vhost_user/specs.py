"""What ``iovirt serve`` is asked to serve: device specs from ``--net``/``--blk`` flags and from a TOML file.

One parser for both spellings, so a configuration means the same whichever
way it is written:

* ``--net [client:]SOCKET[,config=on][,pps=N][,bps=N][,vlan=N|trunk=N:M...]``: ``vlan=N``
  makes the port an 802.1Q access port of VLAN N, ``trunk=N:M`` a trunk of
  those VLANs (1..4094; docs/network-modes.md); ``[[net]]`` tables take
  ``vlan = N`` and ``trunk = "N:M"`` or ``trunk = [N, M]``
* ``--blk [client:]SOCKET,IMAGE[,ro][,size=SIZE][,queues=N][,iops=N][,bps=N]``
* ``--rng [client:]SOCKET[,source=PATH][,rate=BYTES]``
* ``--input [client:]SOCKET,kind=keyboard|mouse|tablet``
* ``--vsock [client:]SOCKET,cid=N,uds=PATH``: a virtio-vsock device whose guest
  has CID N, its host side the UNIX sockets around PATH (hybrid vsock,
  :mod:`iovirt.virtio.vsock.device`); ``[[vsock]]`` tables take ``cid`` and ``uds``
* ``--scsi [client:]SOCKET,IMAGE[,IMAGE...][,ro][,queues=N][,config=on]``: one
  virtio-scsi target, LUN ``i`` on the ``i``-th image
* ``--router IP/PREFIX[,vlan=N]`` (repeatable) and ``--nat IP/PREFIX[,gw=IP][,ports=LOW-HIGH]``:
  the routed and NAT modes (:class:`RouterSpec`, :class:`NatSpec`;
  docs/network-modes.md); in a file ``router = ["IP/PREFIX,vlan=N", ...]``
  and ``nat = "IP/PREFIX,gw=IP"``
* ``iovirt serve --config FILE``: a TOML file (:func:`load_config`) whose
  top-level keys are the serve options (``queues``, ``mtu``, ``tap``,
  ``allow-uid``, ...) and whose ``[[net]]`` / ``[[blk]]`` / ``[[rng]]`` /
  ``[[input]]`` / ``[[vsock]]`` / ``[[scsi]]`` tables are the devices, with the
  keys of the flags (``socket``, ``client``, ``image``, ``ro``, ``size``,
  ``queues``, ``config``, ``source``, ``kind``, ``cid``, ``uds``, and the rate
  limits; ``images``, a list, for scsi).

``client:`` (or ``client = true``) makes iovirt connect to a VMM listening on
SOCKET instead of listening itself (:meth:`~iovirt.vhost_user.server.VhostUserServer.add_client`).
``config=on`` offers VHOST_USER_PROTOCOL_F_CONFIG on a net or scsi device:
iovirt's own front-end and conformance suite read the config space through
it; QEMU's vhost-user net and scsi do not use it and warn when it is offered,
so it is off by default.  The rate limits (``pps``/``bps`` for net, ``iops``/``bps`` for blk)
are positive numbers, handed to the device with :func:`apply_limits`.
"""

from __future__ import annotations

import ipaddress
import tomllib
from dataclasses import dataclass, field
from typing import Any, Callable

from iovirt.errors import IovirtError
from iovirt.virtio.net.ipv4 import Subnet
from iovirt.virtio.net.vlan import PortVlan, parse_trunk, parse_vid

CLIENT_PREFIX = "client:"
"""``--net client:PATH``: connect to a VMM listening on PATH."""

LIMIT_KEYS: dict[str, tuple[str, ...]] = {"net": ("pps", "bps"), "blk": ("iops", "bps"), "rng": (), "input": (),
                                         "vsock": ()}
"""The rate-limit keys each device kind takes: frames/s and bytes/s for net, requests/s and bytes/s for blk.

The rng's ``rate`` (bytes/s) is the entropy device's own option, not one of these."""

MAX_BLK_QUEUES = 256
MAX_QUEUE_PAIRS = 128
_READ_ONLY = ("ro", "read-only", "readonly")


class SpecError(IovirtError):
    """A device spec or configuration file that cannot be served; the text names the flag or key."""


@dataclass(frozen=True)
class DeviceSpec:
    """One device to serve: its kind, its socket, whether iovirt dials it, its image, and its options.

    ``options`` holds the validated ``key=value`` options of the kind
    (:data:`NET_OPTIONS`, :data:`BLK_OPTIONS`), without defaults filled in.
    """

    kind: str
    socket: str
    client: bool = False
    image: str | None = None
    read_only: bool = False
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def limits(self) -> dict[str, float]:
        """The rate limits given (a subset of :data:`LIMIT_KEYS` for the kind)."""
        return {k: self.options[k] for k in LIMIT_KEYS[self.kind] if k in self.options}

    @property
    def config(self) -> bool:
        """Net, scsi: offer VHOST_USER_PROTOCOL_F_CONFIG."""
        return bool(self.options.get("config", False))

    @property
    def vlan(self) -> PortVlan | None:
        """Net: the port's 802.1Q configuration (``vlan=N``: access, ``trunk=N:M``: trunk), ``None``: VLAN-unaware."""
        if "vlan" in self.options:
            return PortVlan(access=self.options["vlan"])
        if "trunk" in self.options:
            return PortVlan(trunk=self.options["trunk"])
        return None

    @property
    def size(self) -> int | None:
        """Blk: the size to create a missing image at."""
        return self.options.get("size")

    @property
    def queues(self) -> int:
        """Blk: request queues (net queue pairs are a serve-wide option)."""
        return int(self.options.get("queues", 1))


def apply_limits(device: Any, limits: dict[str, float]) -> None:
    """Hand the rate limits of a spec (:attr:`DeviceSpec.limits`) to the virtio device's ``set_limits``."""
    device.set_limits(limits)


# -- values ------------------------------------------------------------------------------
def parse_size(text: str | int) -> int:
    """``4096``, ``64K``, ``128M``, ``2G`` → bytes."""
    if isinstance(text, bool):
        raise ValueError(f"not a size: {text!r}")
    if isinstance(text, int):
        value = text
    else:
        units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
        upper = text.strip().upper().removesuffix("B").removesuffix("I")
        value = int(float(upper[:-1]) * units[upper[-1]]) if upper and upper[-1] in units else int(upper)
    if value <= 0:
        raise ValueError(f"a size must be positive, got {text!r}")
    return value


def parse_bool(value: str | bool) -> bool:
    """``on``/``off`` (also yes/no, true/false, 1/0) or a TOML boolean."""
    if isinstance(value, bool):
        return value
    text = value.strip().lower()
    if text in ("on", "yes", "true", "1", ""):
        return True
    if text in ("off", "no", "false", "0"):
        return False
    raise ValueError(f"want on or off, got {value!r}")


def parse_rate(value: str | int | float) -> float:
    """A rate limit: a positive finite number (``1e6``, ``2000``)."""
    if isinstance(value, bool):
        raise ValueError(f"want a positive number, got {value!r}")
    try:
        rate = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"want a positive number, got {value!r}") from None
    if not 0 < rate < float("inf"):
        raise ValueError(f"want a positive number, got {value!r}")
    return rate


def _toml_str(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"want a non-empty string, got {value!r}")
    return value


def _count(low: int, high: int) -> Callable[[str | int], int]:
    def parse(value: str | int) -> int:
        if isinstance(value, bool) or isinstance(value, float):
            raise ValueError(f"want a whole number {low}..{high}, got {value!r}")
        try:
            number = int(value)
        except ValueError:
            raise ValueError(f"want a whole number {low}..{high}, got {value!r}") from None
        if not low <= number <= high:
            raise ValueError(f"want {low}..{high}, got {value!r}")
        return number
    return parse


NET_OPTIONS: dict[str, Callable[[Any], Any]] = {"config": parse_bool, "pps": parse_rate, "bps": parse_rate}
"""``key=value`` options of ``--net``."""
NET_OPTIONS.update(vlan=parse_vid, trunk=parse_trunk)  # 802.1Q access / trunk port (iovirt/virtio/net/vlan.py)

BLK_OPTIONS: dict[str, Callable[[Any], Any]] = {
    "size": parse_size, "queues": _count(1, MAX_BLK_QUEUES), "iops": parse_rate, "bps": parse_rate,
}
"""``key=value`` options of ``--blk``."""

INPUT_KINDS = ("keyboard", "mouse", "tablet")


def _input_kind(value: str) -> str:
    if value not in INPUT_KINDS:
        raise ValueError(f"want one of {', '.join(INPUT_KINDS)}, got {value!r}")
    return value


RNG_OPTIONS: dict[str, Callable[[Any], Any]] = {"source": _toml_str, "rate": parse_rate}
"""``key=value`` options of ``--rng``: the entropy file or FIFO, and the bytes/s limit."""

INPUT_OPTIONS: dict[str, Callable[[Any], Any]] = {"kind": _input_kind}
"""``key=value`` options of ``--input``."""


def _path(value: str) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"want a path, got {value!r}")
    return value


VSOCK_OPTIONS: dict[str, Callable[[Any], Any]] = {"cid": _count(3, 0xFFFFFFFE), "uds": _path}
"""``key=value`` options of ``--vsock`` (both required): the guest's CID (3..2^32-2) and the host UNIX socket path."""

_OPTIONS = {"net": NET_OPTIONS, "blk": BLK_OPTIONS, "rng": RNG_OPTIONS, "input": INPUT_OPTIONS, "vsock": VSOCK_OPTIONS}
_ALIASES = {"num-queues": "queues"}


def _option(kind: str, key: str, value: Any, where: str) -> tuple[str, Any]:
    key = _ALIASES.get(key, key)
    table = _OPTIONS[kind]
    if key not in table:
        raise SpecError(f"{where}: unknown option {key!r} (known: {', '.join(sorted(table))})")
    try:
        return key, table[key](value)
    except (ValueError, TypeError, KeyError) as exc:
        raise SpecError(f"{where}: {key}: {exc}") from None


# -- flags -------------------------------------------------------------------------------
def _split_client(text: str) -> tuple[str, bool]:
    if text.startswith(CLIENT_PREFIX):
        return text[len(CLIENT_PREFIX):], True
    return text, False


def _parse_socket_options(kind: str, text: str, usage: str) -> tuple[DeviceSpec, str]:
    """``[client:]SOCKET[,key=value...]`` of a ``--KIND`` flag: the spec, and where it was written (for errors)."""
    where = f"--{kind} {text!r}"
    socket, *opts = text.split(",")
    socket, client = _split_client(socket)
    if not socket:
        raise SpecError(f"{where}: want {usage}")
    options = dict(_option(kind, *_key_value(opt), where) for opt in opts)
    return DeviceSpec(kind, socket, client, options=options), where


def parse_net(text: str) -> DeviceSpec:
    """Parse ``--net [client:]SOCKET[,config=on][,pps=N][,bps=N][,vlan=N|trunk=N:M...]``."""
    return _net_vlan(*_parse_socket_options("net", text, "[client:]SOCKET[,config=on][,pps=N][,bps=N]"))


def _net_vlan(spec: DeviceSpec, where: str) -> DeviceSpec:
    """A net port is an access port (``vlan=``) or a trunk (``trunk=``), not both."""
    if "vlan" in spec.options and "trunk" in spec.options:
        raise SpecError(f"{where}: give vlan=N (an access port) or trunk=N:M:... (a trunk port), not both")
    return spec


def parse_blk(text: str) -> DeviceSpec:
    """Parse ``--blk [client:]SOCKET,IMAGE[,ro][,size=SIZE][,queues=N][,iops=N][,bps=N]``."""
    where = f"--blk {text!r}"
    parts = text.split(",")
    socket, client = _split_client(parts[0])
    if len(parts) < 2 or not socket or not parts[1]:
        raise SpecError(f"{where}: want [client:]SOCKET,IMAGE[,ro][,size=SIZE][,queues=N][,iops=N][,bps=N]")
    read_only = False
    options: dict[str, Any] = {}
    for opt in parts[2:]:
        if opt in _READ_ONLY:
            read_only = True
            continue
        key, value = _option("blk", *_key_value(opt), where)
        options[key] = value
    return DeviceSpec("blk", socket, client, parts[1], read_only, options)


def parse_rng(text: str) -> DeviceSpec:
    """Parse ``--rng [client:]SOCKET[,source=PATH][,rate=BYTES]``."""
    return _parse_socket_options("rng", text, "[client:]SOCKET[,source=PATH][,rate=BYTES]")[0]


def parse_input(text: str) -> DeviceSpec:
    """Parse ``--input [client:]SOCKET,kind=keyboard|mouse|tablet``."""
    return _with_kind(*_parse_socket_options("input", text, "[client:]SOCKET,kind=keyboard|mouse|tablet"))


def _with_kind(spec: DeviceSpec, where: str) -> DeviceSpec:
    if "kind" not in spec.options:
        raise SpecError(f"{where}: kind= is required (one of {', '.join(INPUT_KINDS)})")
    return spec


def parse_vsock(text: str) -> DeviceSpec:
    """Parse ``--vsock [client:]SOCKET,cid=N,uds=PATH``."""
    where = f"--vsock {text!r}"
    socket, *opts = text.split(",")
    socket, client = _split_client(socket)
    options = dict(_option("vsock", *_key_value(opt), where) for opt in opts)
    if not socket or set(options) != set(VSOCK_OPTIONS):
        raise SpecError(f"{where}: want [client:]SOCKET,cid=N,uds=PATH")
    return DeviceSpec("vsock", socket, client, options=options)


def _key_value(opt: str) -> tuple[str, str]:
    key, _, value = opt.partition("=")
    return key.strip(), value


# -- TOML --------------------------------------------------------------------------------
def _toml_bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"want true or false, got {value!r}")
    return value


def _toml_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"want a whole number, got {value!r}")
    return value


def _toml_ids(value: Any) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                                              for v in value):
        raise ValueError(f"want a list of ids (whole numbers >= 0), got {value!r}")
    return list(value)


def _toml_mode(value: Any) -> int:
    # A string such as "0660" (TOML integers have no leading-zero octal) or 0o660.
    if isinstance(value, str):
        try:
            mode = int(value, 8)
        except ValueError:
            raise ValueError(f"want octal permission bits such as \"0600\", got {value!r}") from None
    else:
        mode = _toml_int(value)
    if not 0 <= mode <= 0o777:
        raise ValueError(f"want permission bits 0000..0777, got {value!r}")
    return mode


def _toml_sandbox(value: Any) -> str | None:
    if value is False:
        return None
    if value is True:
        return "kill"
    if value in ("kill", "log"):
        return str(value)
    raise ValueError(f"want true, false, \"kill\" or \"log\", got {value!r}")


# -- routed and NAT modes (docs/network-modes.md) ----------------------------------------
@dataclass(frozen=True)
class RouterSpec:
    """``--router IP/PREFIX[,vlan=N]``: one interface of the switch's router (a gateway port)."""

    subnet: Subnet
    vlan: PortVlan | None = None


@dataclass(frozen=True)
class NatSpec:
    """``--nat IP/PREFIX[,gw=IP][,ports=LOW-HIGH]``: the router's outside address on the TAP uplink."""

    subnet: Subnet
    gateway: int | None = None
    ports: tuple[int, int] = (1024, 65535)


def _subnet(text: str, where: str) -> Subnet:
    try:
        return Subnet.parse(text)
    except ValueError as exc:
        raise SpecError(f"{where}: {exc}") from None


def parse_router(text: str) -> RouterSpec:
    """Parse ``--router IP/PREFIX[,vlan=N]``."""
    where = f"--router {text!r}"
    address, *opts = str(text).split(",")
    vlan: PortVlan | None = None
    for opt in opts:
        key, value = _key_value(opt)
        if key != "vlan":
            raise SpecError(f"{where}: unknown option {key!r} (known: vlan)")
        try:
            vlan = PortVlan(access=parse_vid(value))
        except ValueError as exc:
            raise SpecError(f"{where}: vlan: {exc}") from None
    return RouterSpec(_subnet(address, where), vlan)


def parse_nat(text: str) -> NatSpec:
    """Parse ``--nat IP/PREFIX[,gw=IP][,ports=LOW-HIGH]``."""
    where = f"--nat {text!r}"
    address, *opts = str(text).split(",")
    subnet = _subnet(address, where)
    gateway: int | None = None
    ports = (1024, 65535)
    for opt in opts:
        key, value = _key_value(opt)
        try:
            if key == "gw":
                gateway = int(ipaddress.IPv4Address(value))
                if not subnet.contains(gateway):
                    raise ValueError(f"{value} is not on {subnet}")
            elif key == "ports":
                low, _, high = value.partition("-")
                ports = (_count(1, 0xFFFF)(low), _count(1, 0xFFFF)(high))
                if ports[0] > ports[1]:
                    raise ValueError(f"empty range {value}")
            else:
                raise SpecError(f"{where}: unknown option {key!r} (known: gw, ports)")
        except (ValueError, ipaddress.AddressValueError) as exc:
            raise SpecError(f"{where}: {key}: {exc}") from None
    return NatSpec(subnet, gateway, ports)


def _toml_routers(value: Any) -> list[RouterSpec]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"want a list of \"IP/PREFIX[,vlan=N]\" strings, got {value!r}")
    try:
        return [parse_router(v) for v in value]
    except SpecError as exc:
        raise ValueError(str(exc)) from None


def _toml_nat(value: Any) -> NatSpec:
    try:
        return parse_nat(_toml_str(value))
    except SpecError as exc:
        raise ValueError(str(exc)) from None


SERVE_KEYS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "queues": ("queues", _count(1, MAX_QUEUE_PAIRS)),
    "mtu": ("mtu", _toml_int),
    "tap": ("tap", _toml_str),
    "mac-table-size": ("mac_table_size", _count(1, 1 << 30)),
    "mac-table-per-port": ("mac_table_per_port", _count(1, 1 << 30)),
    "allow-uid": ("allow_uid", _toml_ids),
    "allow-gid": ("allow_gid", _toml_ids),
    "socket-mode": ("socket_mode", _toml_mode),
    "require-sealed-memory": ("require_sealed_memory", _toml_bool),
    "isolate": ("isolate", _toml_bool),
    "dump-dir": ("dump_dir", _toml_str),
    "sandbox": ("sandbox", _toml_sandbox),
    "router": ("router", _toml_routers),
    "nat": ("nat", _toml_nat),
}
"""Top-level keys of a serve configuration file: key → (the flag's argparse dest, the value's check)."""

_DEVICE_KEYS = {"net": ("socket", "client"), "blk": ("socket", "client", "image", "ro"),
                "rng": ("socket", "client"), "input": ("socket", "client"), "vsock": ("socket", "client"),
                "scsi": ("socket", "client", "images", "ro")}
DEVICE_KINDS = tuple(_DEVICE_KEYS)
"""The device tables of a configuration file, and the argparse dests of their flags."""


def load_config(path: str) -> dict[str, Any]:
    """Read a serve configuration file: the argparse dests it sets (each device kind as a DeviceSpec list).

    Raises :class:`SpecError` naming the line (syntax) or the key (unknown
    key, wrong type, missing socket or image).
    """
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except OSError as exc:
        raise SpecError(f"{path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(f"{path}: not valid TOML: {exc}") from None
    settings: dict[str, Any] = {kind: [] for kind in DEVICE_KINDS}
    for key, value in doc.items():
        if key in DEVICE_KINDS:
            if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
                raise SpecError(f"{path}: {key}: want [[{key}]] tables, got {value!r}")
            parse = _scsi_device if key == "scsi" else _device
            settings[key] = [parse(key, table, f"{path}: [[{key}]] #{i + 1}") for i, table in enumerate(value)]
        elif key in SERVE_KEYS:
            dest, check = SERVE_KEYS[key]
            try:
                settings[dest] = check(value)
            except ValueError as exc:
                raise SpecError(f"{path}: {key}: {exc}") from None
        else:
            known = ", ".join(sorted([*SERVE_KEYS, *DEVICE_KINDS]))
            raise SpecError(f"{path}: unknown key {key!r} (known: {known})")
    return settings


def _device(kind: str, table: dict[str, Any], where: str) -> DeviceSpec:
    fixed = {"socket": None, "client": False, "image": None, "ro": False}
    options: dict[str, Any] = {}
    for key, value in table.items():
        if key in _DEVICE_KEYS[kind]:
            fixed[key] = value
            continue
        if key in _READ_ONLY and kind == "blk":
            fixed["ro"] = value
            continue
        name, checked = _option(kind, key, value, where)
        options[name] = checked
    try:
        socket = _toml_str(fixed["socket"]) if fixed["socket"] is not None else None
    except ValueError as exc:
        raise SpecError(f"{where}: socket: {exc}") from None
    if socket is None:
        raise SpecError(f"{where}: missing key 'socket'")
    try:
        client = _toml_bool(fixed["client"])
        read_only = _toml_bool(fixed["ro"])
    except ValueError as exc:
        raise SpecError(f"{where}: {exc}") from None
    image: str | None = None
    if kind == "blk":
        if fixed["image"] is None:
            raise SpecError(f"{where}: missing key 'image'")
        try:
            image = _toml_str(fixed["image"])
        except ValueError as exc:
            raise SpecError(f"{where}: image: {exc}") from None
    if kind == "vsock" and set(options) != set(VSOCK_OPTIONS):
        raise SpecError(f"{where}: missing key {sorted(set(VSOCK_OPTIONS) - set(options))[0]!r}")
    spec = DeviceSpec(kind, socket, client, image, read_only, options)
    if kind == "net":
        return _net_vlan(spec, where)
    return _with_kind(spec, where) if kind == "input" else spec


# -- scsi ----------------------------------------------------------------------------------
SCSI_OPTIONS: dict[str, Callable[[Any], Any]] = {"queues": _count(1, MAX_BLK_QUEUES), "config": parse_bool}
"""``key=value`` options of ``--scsi``."""
MAX_SCSI_LUNS = 256
_OPTIONS["scsi"] = SCSI_OPTIONS
LIMIT_KEYS["scsi"] = ()


def scsi_images(spec: DeviceSpec) -> list[str]:
    """Scsi: the images of LUN 0, 1, ..."""
    return list(spec.options["images"])


def _scsi_spec(socket: str, client: bool, images: list[str], read_only: bool, options: dict[str, Any],
               where: str) -> DeviceSpec:
    if not images or not all(images):
        raise SpecError(f"{where}: want at least one IMAGE")
    if len(images) > MAX_SCSI_LUNS:
        raise SpecError(f"{where}: {len(images)} images, at most {MAX_SCSI_LUNS} LUNs")
    return DeviceSpec("scsi", socket, client, images[0], read_only, {**options, "images": tuple(images)})


def parse_scsi(text: str) -> DeviceSpec:
    """Parse ``--scsi [client:]SOCKET,IMAGE[,IMAGE...][,ro][,queues=N][,config=on]``."""
    where = f"--scsi {text!r}"
    parts = text.split(",")
    socket, client = _split_client(parts[0])
    if len(parts) < 2 or not socket:
        raise SpecError(f"{where}: want [client:]SOCKET,IMAGE[,IMAGE...][,ro][,queues=N][,config=on]")
    images: list[str] = []
    read_only = False
    options: dict[str, Any] = {}
    for opt in parts[1:]:
        if opt in _READ_ONLY:
            read_only = True
        elif "=" in opt:
            key, value = _option("scsi", *_key_value(opt), where)
            options[key] = value
        else:
            images.append(opt)
    return _scsi_spec(socket, client, images, read_only, options, where)


def _scsi_device(kind: str, table: dict[str, Any], where: str) -> DeviceSpec:
    """A ``[[scsi]]`` table: ``socket``, ``images`` (a list), optional ``client``, ``ro``, ``queues``, ``config``."""
    table = dict(table)
    try:
        socket = _toml_str(table.pop("socket", None))
        client = _toml_bool(table.pop("client", False))
        read_only = _toml_bool(table.pop("ro", False))
    except ValueError as exc:
        raise SpecError(f"{where}: {exc}") from None
    images = table.pop("images", None)
    if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
        raise SpecError(f"{where}: images: want a list of image paths, got {images!r}")
    options = dict(_option(kind, key, value, where) for key, value in table.items())
    return _scsi_spec(socket, client, images, read_only, options, where)
