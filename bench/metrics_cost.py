#!/usr/bin/env python3
"""What METRICS_PORT costs: the same offline burst with metrics off and on, alternating, in one run; and how long
a scrape takes while the fleet is busy.

    .venv/bin/python bench/metrics_cost.py [--procs 2] [--threads 16] [--messages 3000] [--rounds 3]
        [--scrape-every 1.0] [--tool]

Each round runs ``bench/throughput.py``'s measured run twice on the same servers (order alternating between
rounds): once without METRICS_PORT, once with it while a scraper GETs /metrics every --scrape-every seconds (a
Prometheus scraping every 15 s does far less). Prints msgs/s and fleet CPU per message of each run, the median
ratio on/off, and the scrape times (p50, max) with the size of the answer.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

import redis
import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
import throughput as tp

from botworker.devservers import free_port


class Scraper(threading.Thread):
    """GET /metrics every ``every`` seconds until stopped; keeps each answered scrape's time and size."""

    def __init__(self, url: str, every: float) -> None:
        super().__init__(daemon=True)
        self.url, self.every = url, every
        self.times: list[float] = []
        self.sizes: list[int] = []
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.every):
            started = time.perf_counter()
            try:
                reply = requests.get(self.url, timeout=5)
            except requests.RequestException:
                continue  # the fleet is not up yet, or already stopped
            if reply.ok:
                self.times.append(time.perf_counter() - started)
                self.sizes.append(len(reply.content))


def cpu_ms_per_message(res: tp.Result) -> float:
    return res.cpu.get("fleet", 0.0) * 1000 / max(res.messages, 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--scrape-every", type=float, default=1.0)
    parser.add_argument("--tool", action=argparse.BooleanOptionalAction, default=False)
    args = parser.parse_args()
    # What throughput.run_once reads from its namespace.
    run_args = argparse.Namespace(
        threads=args.threads, messages=args.messages, tool=args.tool, warmup=200, conversations=0, batch=100,
        stall=60.0, py_spy=None, fleet_env=None,
    )  # fmt: skip
    print(f"machine: {tp.machine_line()}")
    print(f"code: {tp.code_version()}")
    rates: dict[str, list[float]] = {"off": [], "on": []}
    cpu: dict[str, list[float]] = {"off": [], "on": []}
    scrapes: list[float] = []
    sizes: list[int] = []
    failed = False
    with tp.servers() as srv:
        client = redis.Redis.from_url(srv.redis_url, decode_responses=True)
        tp.migrate(srv.database_url)
        for n in range(args.rounds):
            for mode in ("off", "on") if n % 2 == 0 else ("on", "off"):
                scraper = None
                run_args.fleet_env = None
                if mode == "on":
                    port = free_port()
                    run_args.fleet_env = {"METRICS_PORT": str(port)}
                    scraper = Scraper(f"http://127.0.0.1:{port}/metrics", args.scrape_every)
                    scraper.start()
                res = tp.run_once(srv, client, args.procs, run_args)
                if scraper is not None:
                    scraper.stopped.set()
                    scraper.join()
                    scrapes += scraper.times
                    sizes += scraper.sizes
                rates[mode].append(res.rate)
                cpu[mode].append(cpu_ms_per_message(res))
                failed |= res.check != "OK"
                print(f"round {n + 1} metrics {mode:3}: {res.rate:7.0f} msgs/s, fleet CPU "
                      f"{cpu_ms_per_message(res):.3f} ms/msg, {res.check}", flush=True)  # fmt: skip
        client.close()
    on, off = statistics.median(rates["on"]), statistics.median(rates["off"])
    print(f"\nmedian msgs/s: off {off:.0f}, on {on:.0f}, on/off {on / off:.3f}")
    print(f"median fleet CPU ms/msg: off {statistics.median(cpu['off']):.3f}, on {statistics.median(cpu['on']):.3f}")
    if scrapes:
        scrapes.sort()
        print(f"scrapes during load: {len(scrapes)}, p50 {scrapes[len(scrapes) // 2] * 1000:.1f} ms, "
              f"max {scrapes[-1] * 1000:.1f} ms, answer {max(sizes) // 1024} KiB")  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
