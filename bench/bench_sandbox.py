"""How many requests a second the Telegram sandbox serves, against what fleet benchmarks need.

The sandbox runs in its own process (SandboxProcess, so it shares no GIL with the load). One
asyncio load generator on 127.0.0.1 then, for --duration seconds:
- keeps one getUpdates long poll (timeout 10 s, offset confirmation) open per bot, --bots bots;
- has --senders keep-alive connections calling sendMessage as fast as they are answered;
- has --users keep-alive connections posting /sandbox/send, whose updates wake the long polls.

It prints requests/s by kind, latencies, the sandbox process's CPU use, and the ratio to the
need assumed for fleet benchmarks: a 10-bot fleet handling ~200 user messages/s makes about 2
Bot API calls per message (its share of getUpdates plus a sendMessage reply), ~400 requests/s.

    python bench/bench_sandbox.py [--duration 8] [--bots 20] [--senders 4] [--users 2] [--json]

Standard library only (besides telegram_sandbox); bounded to well under 60 s.
"""

import argparse
import asyncio
import itertools
import json
import pathlib
import statistics
import sys
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from _common import Connection, cpu_seconds  # noqa: E402 (beside this file)
from telegram_sandbox import SandboxProcess  # noqa: E402 (needs the repository on sys.path)

FLEET_MESSAGES_PER_S = 200
CALLS_PER_MESSAGE = 2
NEEDED_REQUESTS_PER_S = FLEET_MESSAGES_PER_S * CALLS_PER_MESSAGE
USERS_PER_BOT = 5
POLL_TIMEOUT_S = 10


class Load:
    """Counters and latency samples shared by the load tasks."""

    def __init__(self, url: str, bots: int):
        host, _, port = url.removeprefix("http://").rpartition(":")
        self.host, self.port = host, int(port)
        self.tokens = [f"{700_000 + n}:BenchSecret{n}" for n in range(bots)]
        self.counts = {"sendMessage": 0, "sandbox/send": 0, "getUpdates": 0, "updates": 0}
        self.errors = 0
        self.send_latency: list[float] = []
        self.delivery_latency: list[float] = []
        self.sent_at: dict[tuple[int, int], float] = {}
        self.measuring = False

    def connection(self) -> Connection:
        return Connection(self.host, self.port)

    def count(self, kind: str, status: int, amount: int = 1) -> None:
        if not self.measuring:
            return
        if status == 200:
            self.counts[kind] += amount
        else:
            self.errors += 1


async def open_chats(load: Load) -> None:
    """Every user writes once to every bot, so the bots may answer them."""
    connection = load.connection()
    for index in range(len(load.tokens)):
        for user in range(USERS_PER_BOT):
            await user_send(load, connection, index, user + 1)
    connection.close()


async def user_send(load: Load, connection: Connection, index: int, user: int) -> int:
    body = json.dumps({"token": load.tokens[index], "user_id": user, "text": "/start"}).encode()
    started = time.perf_counter()
    status, answer = await connection.request("POST", "/sandbox/send", body)
    if status == 200:
        load.sent_at[(index, answer["update_id"])] = started
    return status


async def poller(load: Load, index: int) -> None:
    """A bot's polling loop, as python-telegram-bot runs it: long poll, confirm by offset."""
    connection, offset = load.connection(), 0
    token = load.tokens[index]
    try:
        while True:
            status, body = await connection.request(
                "GET", f"/bot{token}/getUpdates?timeout={POLL_TIMEOUT_S}&offset={offset}")
            now = time.perf_counter()
            load.count("getUpdates", status)
            for update in body.get("result", []):
                offset = update["update_id"] + 1
                sent = load.sent_at.pop((index, update["update_id"]), None)
                if sent is not None and load.measuring:
                    load.delivery_latency.append(now - sent)
            load.count("updates", status, len(body.get("result", [])))
    finally:
        connection.close()


async def send_message(load: Load, connection: Connection, n: int) -> int:
    """The n-th bot reply: sendMessage round-robin over bots and their users."""
    body = json.dumps({"chat_id": n % USERS_PER_BOT + 1, "text": f"reply {n}"}).encode()
    started = time.perf_counter()
    status, _ = await connection.request(
        "POST", f"/bot{load.tokens[n % len(load.tokens)]}/sendMessage", body)
    if load.measuring:
        load.send_latency.append(time.perf_counter() - started)
    return status


async def user_message(load: Load, connection: Connection, n: int) -> int:
    """The n-th user message (/sandbox/send): an update for a long poll to deliver."""
    return await user_send(load, connection, n % len(load.tokens), n % USERS_PER_BOT + 1)


async def hammer(load: Load, kind: str, one_request, worker: int) -> None:
    """One keep-alive connection making requests of one kind as fast as they are answered."""
    connection = load.connection()
    try:
        for n in itertools.count(worker * 7919):
            load.count(kind, await one_request(load, connection, n))
    finally:
        connection.close()


async def run(url: str, pid: int, args: argparse.Namespace) -> dict:
    load = Load(url, args.bots)
    await open_chats(load)
    tasks = [asyncio.create_task(poller(load, i)) for i in range(args.bots)]
    tasks += [asyncio.create_task(hammer(load, "sendMessage", send_message, w))
              for w in range(args.senders)]
    tasks += [asyncio.create_task(hammer(load, "sandbox/send", user_message, w))
              for w in range(args.users)]
    await asyncio.sleep(args.warmup)
    cpu_before, started = cpu_seconds(pid), time.perf_counter()
    load.measuring = True
    await asyncio.sleep(args.duration)
    load.measuring = False
    elapsed, cpu_after = time.perf_counter() - started, cpu_seconds(pid)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return summarize(load, elapsed, cpu_before, cpu_after, args)


def summarize(load: Load, elapsed: float, cpu_before, cpu_after, args) -> dict:
    requests = load.counts["sendMessage"] + load.counts["sandbox/send"] + load.counts["getUpdates"]
    rate = requests / elapsed
    return {
        "duration_s": round(elapsed, 2), "bots_polling": args.bots,
        "sender_connections": args.senders, "user_connections": args.users,
        "requests_per_s": round(rate),
        "sendMessage_per_s": round(load.counts["sendMessage"] / elapsed),
        "sandbox_send_per_s": round(load.counts["sandbox/send"] / elapsed),
        "getUpdates_per_s": round(load.counts["getUpdates"] / elapsed),
        "updates_delivered_per_s": round(load.counts["updates"] / elapsed),
        "errors": load.errors,
        "sendMessage_ms_p50": _ms(load.send_latency, 50),
        "sendMessage_ms_p99": _ms(load.send_latency, 99),
        "update_delivery_ms_p50": _ms(load.delivery_latency, 50),
        "update_delivery_ms_p99": _ms(load.delivery_latency, 99),
        "sandbox_cpu_percent": None if cpu_before is None or cpu_after is None
        else round(100 * (cpu_after - cpu_before) / elapsed),
        "needed_requests_per_s": NEEDED_REQUESTS_PER_S,
        "headroom": round(rate / NEEDED_REQUESTS_PER_S, 1),
    }


def _ms(samples: list[float], percentile: int) -> float | None:
    if len(samples) < 2:
        return None
    return round(1000 * statistics.quantiles(samples, n=100)[percentile - 1], 2)


def report(result: dict) -> str:
    return "\n".join([
        f"Telegram sandbox, {result['duration_s']} s: {result['bots_polling']} bots long-polling, "
        f"{result['sender_connections']} sendMessage connections, "
        f"{result['user_connections']} /sandbox/send connections (all keep-alive, 127.0.0.1)",
        f"  requests/s        {result['requests_per_s']:>7}  (sendMessage "
        f"{result['sendMessage_per_s']}, /sandbox/send {result['sandbox_send_per_s']}, "
        f"getUpdates {result['getUpdates_per_s']})",
        f"  updates/s         {result['updates_delivered_per_s']:>7}  delivered by long polls",
        f"  sendMessage       p50 {result['sendMessage_ms_p50']} ms, "
        f"p99 {result['sendMessage_ms_p99']} ms",
        f"  update delivery   p50 {result['update_delivery_ms_p50']} ms, "
        f"p99 {result['update_delivery_ms_p99']} ms (user send -> bot's getUpdates answer)",
        f"  sandbox CPU       {result['sandbox_cpu_percent']}% of one core; errors "
        f"{result['errors']}",
        f"  need              {NEEDED_REQUESTS_PER_S} req/s (10-bot fleet x ~"
        f"{FLEET_MESSAGES_PER_S} msg/s x {CALLS_PER_MESSAGE} calls/msg)",
        f"  headroom          {result['headroom']}x",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=8.0, help="measured seconds (<= 40)")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds first")
    parser.add_argument("--bots", type=int, default=20, help="bots long-polling")
    parser.add_argument("--senders", type=int, default=4, help="sendMessage connections")
    parser.add_argument("--users", type=int, default=2, help="/sandbox/send connections")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if not 0 < args.duration <= 40 or not 0 <= args.warmup <= 5:
        parser.error("--duration must be in (0, 40] and --warmup in [0, 5] (the run stays "
                     "under a minute)")
    with SandboxProcess() as sandbox:
        result = asyncio.run(run(sandbox.url, sandbox.process.pid, args))
    print(json.dumps(result) if args.json else report(result))
    return 0 if result["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
