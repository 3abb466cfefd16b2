"""The control commands: one table from name to handler, each validating its own arguments.

Every handler runs on the control-plane thread (the vhost-user server's
loop), so it never races a vhost-user request; what the data plane also
touches (rings, the switch table, a port leaving the switch) is read or
changed under the data-path lock.  docs/control.md lists the commands.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Callable

from iovirt.control import metrics, snapshot
from iovirt.control.protocol import BAD_REQUEST, COMMAND_NOT_FOUND, GENERIC_ERROR, ControlError
from iovirt.errors import IovirtError
from iovirt.vhost_user.server import Endpoint, VhostUserServer
from iovirt.virtio.net import impair
from iovirt.virtio.net.router import RouterInterface
from iovirt.virtio.net.switch import MAC_BITS, MAC_MASK, LearningSwitch

log = logging.getLogger("iovirt.control")

LOG_LEVELS = ("debug", "info", "warning", "error")
MAX_LIMITS = 16
"""The most KEY=VALUE pairs one ``limit`` request carries."""

NetFactory = Callable[[str], Endpoint]
"""Adds a net port on a socket path to the server (and the switch); returns its endpoint."""
BlkFactory = Callable[[str, str, bool], Endpoint]
"""Adds a blk device (socket path, image path, read-only) to the server; returns its endpoint."""


@dataclass
class ControlContext:
    """What the commands act on: the server, the switch, and how to make new devices."""

    server: VhostUserServer
    switch: LearningSwitch | None = None
    new_net: NetFactory | None = None
    new_blk: BlkFactory | None = None


Handler = Callable[[ControlContext, dict[str, Any]], Any]


def _args(args: dict[str, Any], required: tuple[str, ...], optional: tuple[str, ...] = ()) -> None:
    """Refuse missing or unknown argument names."""
    missing = [name for name in required if name not in args]
    unknown = sorted(set(args) - set(required) - set(optional))
    if missing or unknown:
        expected = ", ".join(required + tuple(f"[{o}]" for o in optional)) or "none"
        raise ControlError(BAD_REQUEST, f"arguments: missing {missing}, unknown {unknown} (expected {expected})")


def _string(args: dict[str, Any], name: str) -> str:
    value = args[name]
    if not isinstance(value, str) or not value or len(value) > 4096 or "\0" in value:
        raise ControlError(BAD_REQUEST, f"'{name}' must be a non-empty string of at most 4096 characters")
    return value


def _devices(ctx: ControlContext, args: dict[str, Any]) -> list[dict[str, Any]]:
    _args(args, ())
    with ctx.server.dataplane.lock:
        return [snapshot.describe(e) for e in ctx.server.endpoints]


def _stats(ctx: ControlContext, args: dict[str, Any]) -> dict[str, Any]:
    _args(args, (), ("device",))
    # Under the lock: what the workers' kick jobs moved is counted into the devices first (kickloop.py).
    with ctx.server.dataplane.lock:
        if "device" in args:
            return snapshot.counters(snapshot.find(ctx.server, _string(args, "device")))
        reply: dict[str, Any] = {"devices": [snapshot.counters(e) for e in ctx.server.endpoints]}
        if ctx.switch is not None:
            reply["switch"] = snapshot.switch_counters(ctx.switch)
            router = next((p.router for p in ctx.switch.ports if isinstance(p, RouterInterface)), None)
            if router is not None:  # --router / --nat (docs/network-modes.md)
                reply["router"] = router.counters()
    return reply


def _fdb(ctx: ControlContext, args: dict[str, Any]) -> list[dict[str, Any]]:
    _args(args, ())
    switch = ctx.switch
    if switch is None:
        raise ControlError(GENERIC_ERROR, "this process has no switch")
    names = {id(e.device.device): snapshot.device_name(e) for e in ctx.server.endpoints}
    with ctx.server.dataplane.lock:
        now = switch.clock()
        entries = [(mac, entry.port, entry.seen) for mac, entry in switch.table.items()]
    # The table key is (VLAN, MAC) as one integer (switch.fdb_key); VLAN 0 is the untagged, VLAN-unaware domain.
    return [
        {"mac": (key & MAC_MASK).to_bytes(6, "big").hex(":"), "vlan": key >> MAC_BITS,
         "port": names.get(id(port), port.name), "age": round(now - seen, 3)}
        for key, port, seen in entries
    ]


def _add_net(ctx: ControlContext, args: dict[str, Any]) -> dict[str, Any]:
    _args(args, ("socket",))
    if ctx.new_net is None:
        raise ControlError(GENERIC_ERROR, "this process cannot add net ports")
    return _added(ctx.new_net, _string(args, "socket"))


def _add_blk(ctx: ControlContext, args: dict[str, Any]) -> dict[str, Any]:
    _args(args, ("socket", "image"), ("read_only",))
    if ctx.new_blk is None:
        raise ControlError(GENERIC_ERROR, "this process cannot add blk devices")
    read_only = args.get("read_only", False)
    if not isinstance(read_only, bool):
        raise ControlError(BAD_REQUEST, "'read_only' must be true or false")
    return _added(ctx.new_blk, _string(args, "socket"), _string(args, "image"), read_only)


def _added(factory: Callable[..., Endpoint], socket_path: str, *more: Any) -> dict[str, Any]:
    if not os.path.isabs(socket_path):
        raise ControlError(BAD_REQUEST, f"socket {socket_path!r} must be an absolute path")
    try:
        endpoint = factory(socket_path, *more)
    except (IovirtError, OSError, ValueError) as exc:
        raise ControlError(GENERIC_ERROR, f"cannot add a device on {socket_path}: {exc}") from None
    log.info("control: added %s on %s", snapshot.device_name(endpoint), socket_path)
    return {"name": snapshot.device_name(endpoint), "socket": endpoint.path}


def _remove(ctx: ControlContext, args: dict[str, Any]) -> dict[str, Any]:
    _args(args, ("device",))
    endpoint = snapshot.find(ctx.server, _string(args, "device"))
    name = snapshot.device_name(endpoint)
    device = endpoint.device.device
    ctx.server.remove_socket(endpoint)  # its front-end disconnected, its rings stopped
    with ctx.server.dataplane.lock:  # no frame is being switched into the port as it leaves
        if ctx.switch is not None and device in ctx.switch.ports:
            ctx.switch.detach(device)  # type: ignore[arg-type]
    close = getattr(device, "close", None)  # a blk device's image
    if close is not None:
        close()
    log.info("control: removed %s", name)
    return {"name": name}


def _log_level(ctx: ControlContext, args: dict[str, Any]) -> dict[str, Any]:
    _args(args, ("level",))
    level = args["level"]
    if level not in LOG_LEVELS:
        raise ControlError(BAD_REQUEST, f"level must be one of {', '.join(LOG_LEVELS)}, got {level!r}")
    logging.getLogger().setLevel(level.upper())
    log.warning("control: log level set to %s", level)
    return {"level": level}


def _limit(ctx: ControlContext, args: dict[str, Any]) -> dict[str, Any]:
    _args(args, ("device", "limits"))
    endpoint = snapshot.find(ctx.server, _string(args, "device"))
    limits = args["limits"]
    if not isinstance(limits, dict) or not 0 < len(limits) <= MAX_LIMITS:
        raise ControlError(BAD_REQUEST, f"'limits' must be an object of 1..{MAX_LIMITS} KEY: NUMBER pairs")
    values: dict[str, float] = {}
    for key, value in limits.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value < float("inf"):
            raise ControlError(BAD_REQUEST, f"limit {key} = {value!r} is not a non-negative number")
        values[key] = float(value)
    device = endpoint.device.device
    set_limits = getattr(device, "set_limits", None)
    if set_limits is None:
        raise ControlError(GENERIC_ERROR, f"{snapshot.device_name(endpoint)} ({device.name}) takes no limits")
    try:
        with ctx.server.dataplane.lock:
            set_limits(values)
    except (KeyError, ValueError) as exc:
        raise ControlError(BAD_REQUEST, f"{snapshot.device_name(endpoint)}: {exc}") from None
    log.info("control: %s limits %s", snapshot.device_name(endpoint), values)
    return {"name": snapshot.device_name(endpoint), "limits": values}


def _impair(ctx: ControlContext, args: dict[str, Any]) -> dict[str, Any]:
    _args(args, ("device", "impairment"))
    endpoint = snapshot.find(ctx.server, _string(args, "device"))
    name = snapshot.device_name(endpoint)
    options = args["impairment"]
    if not isinstance(options, dict) or len(options) > MAX_LIMITS or not all(
            isinstance(v, (str, int, float)) and not isinstance(v, bool) and len(str(v)) <= 64 for v in options.values()):
        raise ControlError(BAD_REQUEST, f"'impairment' must be an object of at most {MAX_LIMITS} KEY: VALUE pairs "
                                        "(strings or numbers)")
    switch, device = ctx.switch, endpoint.device.device
    if switch is None or device not in switch.ports:
        raise ControlError(GENERIC_ERROR, f"{name} ({device.name}) is not a port of a switch: it takes no impairments")
    try:
        directions, impairment = impair.from_options(options)
    except impair.ImpairmentError as exc:
        raise ControlError(BAD_REQUEST, f"{name}: {exc}") from None
    if not impairment.active and set(options) <= {impair.DIR_KEY}:
        directions = directions if options else impair.DIRECTIONS  # no keys at all: stop impairing the port
    port: Any = device  # a port of the switch: a VirtioNet, with its counters
    with ctx.server.dataplane.lock:
        timers = (endpoint.worker or ctx.server.dataplane.home).call_later  # the port's own worker: held frames go on there
        current = impair.impair_port(switch, port, directions, impairment, timers, port.stats)
        settings = current.settings() if current is not None else {d: {} for d in impair.DIRECTIONS}
    log.info("control: %s impairments %s", name, settings)
    return {"name": name, "impairments": settings}


def _counting(ctx: ControlContext, args: dict[str, Any]) -> dict[str, Any]:
    _args(args, ("device", "enabled"))
    endpoint = snapshot.find(ctx.server, _string(args, "device"))
    if not isinstance(args["enabled"], bool):
        raise ControlError(BAD_REQUEST, "'enabled' must be true or false")
    with ctx.server.dataplane.lock:  # what was moved before is counted as it was
        endpoint.device.device.counting = args["enabled"]
    return {"name": snapshot.device_name(endpoint), "counting": args["enabled"]}


def _metrics(ctx: ControlContext, args: dict[str, Any]) -> str:
    _args(args, ())
    with ctx.server.dataplane.lock:  # as _stats
        devices = [snapshot.counters(e) for e in ctx.server.endpoints]
        switch = snapshot.switch_counters(ctx.switch) if ctx.switch is not None else None
    return metrics.render(devices, switch)


def _commands(ctx: ControlContext, args: dict[str, Any]) -> list[str]:
    _args(args, ())
    return sorted(COMMANDS)


COMMANDS: dict[str, Handler] = {
    "devices": _devices,
    "stats": _stats,
    "fdb": _fdb,
    "add-net": _add_net,
    "add-blk": _add_blk,
    "remove": _remove,
    "log-level": _log_level,
    "limit": _limit,
    "counting": _counting,
    "impair": _impair,
    "metrics": _metrics,
    "commands": _commands,
}
"""Command name → handler (docs/control.md)."""


def run(ctx: ControlContext, command: str, args: dict[str, Any]) -> Any:
    """Run one command; :class:`ControlError` for a request that cannot be served."""
    handler = COMMANDS.get(command)
    if handler is None:
        raise ControlError(COMMAND_NOT_FOUND, f"unknown command {command[:64]!r} (commands: {', '.join(sorted(COMMANDS))})")
    return handler(ctx, args)
