"""What an area is, and the runner that compares one: episodes, counting, shrinking.

An :class:`Area` pairs one QEMU device model (through qtest) with iovirt's
model of the same device.  The runner asks it for a random sequence of
operations, runs the sequence on both sides from the reset state, and
compares the observations one by one.  A difference an
:class:`~iovirt.crosscheck.expected.ExpectedDifference` explains is counted
apart; the first unexplained one of a sequence ends it (the two sides'
states have diverged, so later differences say nothing new), and the
sequence up to it is shrunk to a minimal replayable one.

New areas (SR-IOV, VT-d registers, VT-d DMA) subclass :class:`Area` and are
listed in :mod:`iovirt.crosscheck.areas`.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Sequence

from iovirt.crosscheck.expected import ExpectedDifference
from iovirt.crosscheck.ops import Op, shrink

Observation = object
"""What one operation gave: an int read, a tuple of delivered messages, or None."""

EPISODE_OPS = 256


class Area:
    """One device model compared on both sides.  Subclasses implement every method.

    Lifetime: :meth:`start` (launch QEMU, build iovirt's model), any number of
    :meth:`run_qemu` / :meth:`run_iovirt` (each starts from the reset state),
    :meth:`close`.
    """

    name = ""
    expected: tuple[ExpectedDifference, ...] = ()

    def start(self) -> None:
        """Launch QEMU and build iovirt's model."""
        raise NotImplementedError

    def generate(self, rng: random.Random, count: int) -> list[Op]:
        """A random sequence of ``count`` operations."""
        raise NotImplementedError

    def run_qemu(self, ops: Sequence[Op]) -> list[Observation]:
        """Reset QEMU's device, run ``ops``, return one observation per op."""
        raise NotImplementedError

    def run_iovirt(self, ops: Sequence[Op]) -> list[Observation]:
        """Reset iovirt's model, run ``ops``, return one observation per op."""
        raise NotImplementedError

    def explain(
        self, ops: Sequence[Op], index: int, qemu: Observation, iovirt: Observation
    ) -> ExpectedDifference | None:
        """The expected difference explaining the mismatch at ``ops[index]``, or None.

        The whole sequence is given: some differences show only after an
        earlier operation (a reset QEMU does not carry out in full).
        """
        return None

    def close(self) -> None:
        """Stop QEMU."""
        raise NotImplementedError

    def __enter__(self) -> Area:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class Mismatch:
    """An unexplained difference and the minimal sequence that shows it."""

    ops: list[Op]
    qemu: Observation
    iovirt: Observation

    def replay_text(self) -> str:
        """The sequence as replay lines, the last one annotated with both observations."""
        lines = [str(op) for op in self.ops]
        lines[-1] += f"    # qemu={show_observation(self.qemu)} iovirt={show_observation(self.iovirt)}"
        return "\n".join(lines)


def show_observation(observation: Observation) -> str:
    """An observation as replay text shows it (ints in hex)."""
    return f"{observation:#x}" if isinstance(observation, int) else repr(observation)


@dataclass
class AreaResult:
    """Counts of one area's run: operations compared, unexplained mismatches, expected differences."""

    area: str
    compared: int = 0
    mismatches: list[Mismatch] = field(default_factory=list)
    expected: dict[ExpectedDifference, int] = field(default_factory=dict)
    seconds: float = 0.0
    by_kind: dict[str, int] = field(default_factory=dict)
    """Operations compared, by kind (``r``, ``w``, ``fire``, ``dma``...)."""

    def as_json(self) -> dict[str, object]:
        """``{"compared": N, "mismatches": M, "expected_differences": E, ...}``."""
        return {
            "compared": self.compared,
            "mismatches": len(self.mismatches),
            "expected_differences": sum(self.expected.values()),
            "seconds": round(self.seconds, 3),
            "compared_by_kind": dict(sorted(self.by_kind.items())),
            "expected_by_register": {
                f"{e.space}@{e.offset:#x}/{e.size}:{e.bits:#x}" + (f" [{e.condition}]" if e.condition else ""): n
                for e, n in self.expected.items()
            },
            "minimal_sequences": [m.replay_text() for m in self.mismatches],
        }


def _first_unexplained(area: Area, ops: Sequence[Op]) -> tuple[int, Observation, Observation] | None:
    qemu = area.run_qemu(ops)
    iovirt = area.run_iovirt(ops)
    for i, (a, b) in enumerate(zip(qemu, iovirt)):
        if a != b and area.explain(ops, i, a, b) is None:
            return i, a, b
    return None


def minimal_sequence(area: Area, ops: Sequence[Op]) -> Mismatch:
    """Shrink ``ops`` (whose last op mismatches unexplained) to a 1-minimal sequence."""

    def fails(candidate: Sequence[Op]) -> bool:
        found = _first_unexplained(area, candidate)
        return found is not None and found[0] == len(candidate) - 1

    small = shrink(ops, fails)
    found = _first_unexplained(area, small)
    assert found is not None
    return Mismatch(small, found[1], found[2])


def compare(area: Area, ops: Sequence[Op], result: AreaResult) -> None:
    """Run one sequence on both sides and add to ``result``."""
    qemu = area.run_qemu(ops)
    iovirt = area.run_iovirt(ops)
    for i, (a, b) in enumerate(zip(qemu, iovirt)):
        result.compared += 1
        result.by_kind[ops[i].kind] = result.by_kind.get(ops[i].kind, 0) + 1
        if a == b:
            continue
        expected = area.explain(ops, i, a, b)
        if expected is not None:
            result.expected[expected] = result.expected.get(expected, 0) + 1
            continue
        result.mismatches.append(minimal_sequence(area, ops[: i + 1]))
        return


def run_area(area: Area, seed: int, count: int, episode: int = EPISODE_OPS) -> AreaResult:
    """Compare ``count`` random operations (seeded) in sequences of ``episode`` ops."""
    result = AreaResult(area.name)
    rng = random.Random(f"{area.name}:{seed}")
    started = time.monotonic()
    generated = 0
    while generated < count:
        ops = area.generate(rng, min(episode, count - generated))
        generated += len(ops)
        compare(area, ops, result)
    result.seconds = time.monotonic() - started
    return result
