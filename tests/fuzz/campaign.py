"""Run a fuzz campaign against ``iovirt serve`` and print its figures as a final JSON line (``make fuzz``).

    python3 tests/fuzz/campaign.py --fuzzer protocol --units 10000000 --seed 1 --workers 2
    python3 tests/fuzz/campaign.py --fuzzer chain --units 10000000 --seed 1 --workers 2

Environment defaults: ``FUZZ_MESSAGES``, ``FUZZ_CHAINS``, ``FUZZ_SEED``,
``FUZZ_WORKERS``, ``FUZZ_SECONDS`` (a time limit per fuzzer).  Findings (with
each worker's last messages) are written to ``WORKDIR/<fuzzer>/findings.txt``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import chain_fuzz  # noqa: E402
import protocol_fuzz  # noqa: E402
from fuzz_harness import Campaign, Summary  # noqa: E402


def campaign(fuzzer: str, workdir: Path, units: int, seed: int, workers: int, seconds: float | None) -> Campaign:
    """The campaign of ``fuzzer`` ("protocol" or "chain")."""
    if fuzzer == "protocol":
        return Campaign("protocol", protocol_fuzz.make, workdir / "protocol", units, seed, workers,
                        epoch_units=4000 * workers, max_seconds=seconds)
    return Campaign("chain", chain_fuzz.make, workdir / "chain", units, seed, workers,
                    epoch_units=20000 * workers, nets_per_slot=2, max_seconds=seconds)


def main() -> int:
    """Parse arguments, run the campaigns, print progress lines and the JSON summary."""
    env = os.environ.get
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fuzzer", choices=("protocol", "chain", "both"), default="both")
    parser.add_argument("--messages", type=int, default=int(env("FUZZ_MESSAGES", "10000000")))
    parser.add_argument("--chains", type=int, default=int(env("FUZZ_CHAINS", "10000000")))
    parser.add_argument("--units", type=int, default=None,
                        help="messages or chains for each fuzzer run (instead of --messages and --chains)")
    parser.add_argument("--seed", type=int, default=int(env("FUZZ_SEED", "1")))
    parser.add_argument("--workers", type=int, default=int(env("FUZZ_WORKERS", "2")))
    parser.add_argument("--seconds", type=float, default=float(env("FUZZ_SECONDS", "0")) or None,
                        help="stop each fuzzer after this many seconds")
    parser.add_argument("--workdir", default=env("FUZZ_WORKDIR", ""))
    args = parser.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="iovirt-fuzz-"))
    out: dict[str, object] = {"seed": args.seed, "workers": args.workers, "workdir": str(workdir)}
    kinds = ["protocol", "chain"] if args.fuzzer == "both" else [args.fuzzer]
    for kind in kinds:
        units = args.units if args.units is not None else args.messages if kind == "protocol" else args.chains
        start = time.monotonic()

        def progress(summary: Summary) -> None:
            if summary.epochs % 10 == 0:
                print(f"{kind}: {summary.units} units, {summary.units / (time.monotonic() - start):.0f}/s, "
                      f"crashes {summary.crashes}, hangs {summary.hangs}, tracebacks {summary.tracebacks}, "
                      f"drift {summary.drifts}, bad writes {summary.bad_writes}", file=sys.stderr, flush=True)

        run = campaign(kind, workdir, units, args.seed, args.workers, args.seconds)
        run.on_epoch = progress
        summary = run.run()
        for finding in summary.findings:
            print(f"finding: {finding.kind} (epoch {finding.epoch}): {finding.detail.splitlines()[0][:200]}",
                  file=sys.stderr)
        out[kind] = summary.as_json()
    unit_name = {"protocol": "messages_per_s", "chain": "chains_per_s"}
    for kind in kinds:
        data = out[kind]
        assert isinstance(data, dict)
        out[unit_name[kind]] = data["rate"]
    totals = {key: sum(out[k][key] for k in kinds) for key in ("crashes", "hangs", "tracebacks", "drifts", "bad_writes")}  # type: ignore[index]
    out.update(totals)
    print(json.dumps(out))
    return 0 if not any(totals.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
