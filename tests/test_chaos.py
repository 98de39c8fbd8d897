"""The chaos test in CI: the short version of `bench/chaos.py` - three bots under `python main.py`,
six users, every kind of fault once (kill -9 of a bot, of the database agent, of the forkserver;
PostgreSQL stopped and restarted; a bot SIGSTOPped; Bot API windows of 502s, dropped connections,
slow answers and 429s) within 50 s. No message may be lost, the supervisor must never exit, and
the fleet must end healthy. Real processes, a real PostgreSQL, the real bots on the sandbox."""

from __future__ import annotations

import sys

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))

from _chaos_faults import KINDS  # noqa: E402
from _chaos_run import Options, run  # noqa: E402


def test_every_fault_is_survived_with_no_message_lost_and_the_fleet_healthy_at_the_end(tmp_path):
    lines: list[str] = []
    result = run(Options(seed=20261204, duration=50.0, gap=(3.5, 4.5)), lines.append, tmp_path / "dims.log")
    output = "\n".join(lines)
    kinds = {f["kind"] for f in result.faults if not f["skipped"]}
    assert result.passed, f"{output}\n--- the fleet's log ends:\n{(tmp_path / 'dims.log').read_text()[-6000:]}"
    assert kinds == set(KINDS), f"not every kind was injected: {sorted(set(KINDS) - kinds)}\n{output}"
    assert not result.lost and result.sent > 150, output
