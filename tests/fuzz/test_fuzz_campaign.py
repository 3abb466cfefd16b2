"""Short seeded fuzz campaigns against a real ``iovirt serve`` (``make fuzz`` runs the long ones).

Each test runs one fuzzer for a few seconds with a fixed seed and fails with
every finding: a crash, a hang (the canary timed out), fd or RSS drift, a
traceback in the server's log, a device write outside a device-writable
buffer, or an image write outside the targeted range.  The full reports
(seeds, each worker's last messages) are in ``findings.txt`` under the
test's temporary directory.
"""

from __future__ import annotations

import chain_fuzz
import protocol_fuzz
from fuzz_harness import Campaign, Summary

SEED = 12


def _report(summary: Summary) -> str:
    lines = [f"{f.kind} (epoch {f.epoch}, seeds {f.seeds}): {f.detail.splitlines()[0][:300]}" for f in summary.findings]
    return f"{len(summary.findings)} findings in {summary.units} units:\n" + "\n".join(lines)


def _clean(summary: Summary) -> bool:
    return not (summary.crashes or summary.hangs or summary.tracebacks or summary.drifts or summary.bad_writes
                or summary.harness_errors)


def test_short_protocol_campaign(tmp_path):
    summary = Campaign("protocol", protocol_fuzz.make, tmp_path, total=60000, seed=SEED, workers=2,
                       epoch_units=8000, canary_timeout=2.0, max_seconds=30).run()
    assert summary.units >= 60000 or not _clean(summary)
    assert _clean(summary), _report(summary)


def test_short_chain_campaign(tmp_path):
    summary = Campaign("chain", chain_fuzz.make, tmp_path, total=20000, seed=SEED, workers=2,
                       epoch_units=10000, nets_per_slot=2, canary_timeout=2.0, max_seconds=30).run()
    assert _clean(summary), _report(summary)
    assert summary.units >= 20000
    assert summary.counters.get("blk_done", 0) and summary.counters.get("tx_done", 0)
