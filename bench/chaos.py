"""The chaos bench: DIMS under sustained faults, with no message lost.

    python bench/chaos.py [--seeds 1,2,3,4,5] [--duration 120] [--bots 3] [--users 6] [--rate 4]
                          [--faults kill-bot,pg-stop,...] [--gap 4,8] [--log DIR]

Each seed is one run (`_chaos_run.py`): a fleet of `--bots` bots under `python main.py` on the
sandbox and a private PostgreSQL; `--users` users sending `--rate` numbered messages a second
in all; one fault every `--gap` seconds from a seeded schedule of the kinds in `--faults`
(`_chaos_faults.KINDS`: kill -9 of a bot, of the database agent, of the forkserver; PostgreSQL
stopped or restarted; a bot SIGSTOPped for 3 s; 2-second windows of Bot API 502s, dropped
connections, slow answers and 429s). After the chaos period and a drain it checks that every
message was answered (lost 0), that a message was answered twice only when it was in hand at a
kill or a PostgreSQL crash, that the supervisor never exited, that `system_health` is ok with every bot RUNNING, that
the supervisor's memory stayed flat and that no zombie is left. It prints each fault, the time
until the bots it hit answered again, a summary line per seed and a table over the seeds; the
exit status is 0 only if every seed passed.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from _chaos_faults import KINDS  # noqa: E402
from _chaos_run import Options, run  # noqa: E402


def _numbers(text: str, kind=float) -> list:
    try:
        return [kind(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _kinds(text: str) -> tuple[str, ...]:
    kinds = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise argparse.ArgumentTypeError(f"unknown fault kind(s) {', '.join(unknown) or '(none)'}; "
                                         f"known: {', '.join(KINDS)}")
    return kinds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=lambda t: _numbers(t, int), default=[1, 2, 3, 4, 5])
    parser.add_argument("--duration", type=float, default=120.0, help="seconds of chaos per seed")
    parser.add_argument("--bots", type=int, default=3)
    parser.add_argument("--users", type=int, default=6)
    parser.add_argument("--rate", type=float, default=4.0, help="messages a second, all users together")
    parser.add_argument("--faults", type=_kinds, default=KINDS)
    parser.add_argument("--gap", type=_numbers, default=[4.0, 8.0], help="MIN,MAX seconds between faults")
    parser.add_argument("--log", type=pathlib.Path, help="keep each run's DIMS log in this directory")
    args = parser.parse_args(argv)
    if len(args.gap) != 2 or not 0 < args.gap[0] <= args.gap[1]:
        parser.error("--gap: expected MIN,MAX with 0 < MIN <= MAX")
    if args.bots < 1 or args.users < 1 or args.rate <= 0 or args.duration <= 0:
        parser.error("--bots, --users, --rate and --duration must be positive")
    results = []
    for seed in args.seeds:
        log = None
        if args.log:
            args.log.mkdir(parents=True, exist_ok=True)
            log = args.log / f"chaos-seed{seed}.log"
        options = Options(seed, args.duration, args.bots, args.users, args.rate, args.faults, tuple(args.gap))
        results.append(run(options, lambda line: print(line, flush=True), log))
    print()
    print(f"{'seed':>5} {'faults':>7} {'sent':>6} {'lost':>5} {'dups':>5} {'rec median':>11} {'rec max':>8}  result")
    for r in results:
        rec = r.recoveries()
        print(f"{r.seed:>5} {len([f for f in r.faults if not f['skipped']]):>7} {r.sent:>6} {len(r.lost):>5} "
              f"{r.duplicates:>5} {statistics.median(rec) if rec else float('nan'):>10.2f}s "
              f"{max(rec) if rec else float('nan'):>7.2f}s  {'pass' if r.passed else 'FAIL'}")
    every = [x for r in results for x in r.recoveries()]
    print(f"all seeds: {sum(len([f for f in r.faults if not f['skipped']]) for r in results)} faults, lost "
          f"{sum(len(r.lost) for r in results)} of {sum(r.sent for r in results)}, recovery median "
          f"{statistics.median(every) if every else float('nan'):.2f} s, max {max(every) if every else float('nan'):.2f} s")
    return 0 if all(r.passed for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
