"""The command line: ``botworker [run|migrate|status|send|demo|sandbox-check]``; maps failures to the exit codes of
errors.py."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

import redis

from . import errors
from .config import SETTINGS, Config, load_config
from .errors import ConfigError
from .logs import setup_logging


def _settings_help() -> str:
    lines = []
    for s in SETTINGS.values():
        lines.append(f"  {s.env:<24} {s.help}" + (f" (default {s.default_text})" if s.default_text else ""))
    return "\n".join(lines)


def _options(top: bool) -> argparse.ArgumentParser:
    """The settings options, accepted before the verb (``top``) and after it. After it, an option left out must not
    reset one given before it: there they have no default at all."""
    none: Any = None if top else argparse.SUPPRESS
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--env-file",
        default=none,
        help="settings file read before the environment (default: .env if it exists; a named file must exist; "
        '"": none)',
    )
    common.add_argument("--redis-url", dest="redis_url", default=none, help="overrides REDIS_URL")
    common.add_argument("--database-url", dest="database_url", default=none, help="overrides DATABASE_URL")
    common.add_argument(
        "--log-level", dest="log_level", default=none, type=str.upper, choices=["DEBUG", "INFO", "WARNING", "ERROR"]
    )
    return common


def _parser() -> argparse.ArgumentParser:
    common = _options(top=False)
    parser = argparse.ArgumentParser(prog="botworker", description="Bot message worker.", parents=[_options(top=True)])
    sub = parser.add_subparsers(dest="command")
    run = sub.add_parser(
        "run",
        parents=[common],
        help="run the supervisor and its workers (default)",
        epilog="settings (environment or --env-file; docs/configuration.md):\n" + _settings_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("--procs", help="worker processes (overrides WORKER_PROCS)")
    run.add_argument("--threads", help="consumer threads per worker process (overrides WORKER_THREADS)")
    sub.add_parser("migrate", parents=[common], help="create the contract's tables if missing (development)")
    status = sub.add_parser("status", parents=[common], help="queue and fleet status; exit 5 if no worker is alive")
    status.add_argument("--json", action="store_true", help="print JSON")
    send = sub.add_parser("send", parents=[common], help="push one message and print the reply")
    send.add_argument("--bot", required=True)
    send.add_argument("--user", required=True)
    send.add_argument("--instance")
    send.add_argument("--timeout", type=float, default=30.0)
    send.add_argument("text")
    dead = sub.add_parser(
        "dead", help="dead letters: list, show, requeue, purge (settings options before `dead` or at the end)"
    )
    dead_sub = dead.add_subparsers(dest="dead_command", required=True)
    listing = dead_sub.add_parser("list", parents=[common], help="newest first: id, failedAt, code, error")
    listing.add_argument("--limit", type=int, default=50, help="at most this many (default 50; 0: all)")
    listing.add_argument("--json", action="store_true", help="print the entries as JSON lines")
    show = dead_sub.add_parser("show", parents=[common], help="one dead letter, whole, as JSON")
    show.add_argument("message_id")
    requeue = dead_sub.add_parser(
        "requeue", parents=[common], help="back in line with a fresh attempt count: by message id, or --all"
    )
    requeue.add_argument("message_ids", nargs="*", metavar="MESSAGE_ID")
    requeue.add_argument("--all", action="store_true")
    purge = dead_sub.add_parser("purge", parents=[common], help="delete: by message id, --older-than AGE, or --all")
    purge.add_argument("message_ids", nargs="*", metavar="MESSAGE_ID")
    purge.add_argument("--older-than", dest="older_than", help="an age: 90s, 30m, 12h, 7d")
    purge.add_argument("--all", action="store_true")
    demo = sub.add_parser("demo", parents=[common], help="private servers + demo bot + fleet + a short conversation")
    demo.add_argument("--procs", type=int, default=2)
    check = sub.add_parser(
        "sandbox-check",
        parents=[common],
        help="try every sandbox layer from inside real runs, as worker 0 would; exit 7 if a required one is missing",
    )
    check.add_argument("--json", action="store_true", help="print JSON")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    command = args.command or "run"
    flags: dict[str, Any] = {
        "redis_url": args.redis_url,
        "database_url": args.database_url,
        "log_level": args.log_level,
    }
    if command == "run":
        flags["procs"] = args.procs  # validated by the loader, as WORKER_PROCS is
        flags["worker_threads"] = args.threads
    # No --env-file: .env if there is one. A named file must exist (a typo must not run on defaults); "": none.
    env_file, required = (".env", False) if args.env_file is None else (args.env_file or None, True)

    def configure() -> Config:
        return load_config(flags, env_file=env_file, env_file_required=required)

    try:
        cfg = configure()
    except ConfigError as exc:
        print(f"botworker: configuration error: {exc}", file=sys.stderr)
        return errors.EXIT_CONFIG
    setup_logging(cfg.log_level, cfg.log_format)
    try:
        if command == "run":
            from .supervisor import Supervisor

            return Supervisor(cfg, reload=configure).run()
        if command == "migrate":
            from .schema import migrate

            created = migrate(cfg.database_url)
            print("created: " + (", ".join(created) if created else "nothing (all present)"))
            return errors.EXIT_OK
        if command == "status":
            return _status(cfg, args.json)
        if command == "send":
            return _send(cfg, args)
        if command == "dead":
            return _dead(cfg, args)
        if command == "sandbox-check":
            from sandbox import check

            argv = ["--root", cfg.sandbox_root, "--uid", str(cfg.sandbox_uid), "--gid", str(cfg.sandbox_gid)]
            argv += ["--allow-weak"] * cfg.sandbox_allow_weak + ["--json"] * args.json
            return errors.EXIT_OK if check.main(argv) == 0 else errors.EXIT_SANDBOX_MISSING
        if command == "demo":
            from .demo import run_demo

            servers = ("redis_url", "redis_host", "redis_sentinels", "database_url", "db_host")
            own = any(cfg.sources[k] != "default" for k in servers)
            return run_demo(cfg, use_devstack=not own, procs=args.procs)
    except KeyboardInterrupt:
        return errors.EXIT_OK
    except (redis.RedisError, OSError) as exc:
        print(f"botworker {command}: {exc}", file=sys.stderr)
        return errors.EXIT_ERROR
    return errors.EXIT_USAGE


_AGE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _age_seconds(text: str) -> float:
    """``90s``, ``30m``, ``12h``, ``7d`` (a bare number is seconds)."""
    unit = text[-1:] if text[-1:] in _AGE_UNITS else "s"
    number = text[:-1] if text[-1:] in _AGE_UNITS else text
    try:
        value = float(number)
    except ValueError:
        raise ValueError(f"not an age: {text!r} (try 90s, 30m, 12h or 7d)") from None
    if value < 0:
        raise ValueError(f"not an age: {text!r}")
    return value * _AGE_UNITS[unit]


def _dead(cfg: Config, args: argparse.Namespace) -> int:
    """`botworker dead list|show|requeue|purge`: exit 0, or 6 when a named message is not a dead letter."""
    from datetime import UTC, datetime, timedelta

    from .queue import connect, dead_letters, purge_dead, requeue_dead

    client = connect(cfg, decode_responses=True, socket_timeout=cfg.redis_timeout)
    entries = dead_letters(client)
    if args.dead_command == "list":
        shown = entries if args.limit == 0 else entries[: args.limit]
        for stored, entry in shown:
            if args.json:
                print(stored)
            else:
                error = str(entry.get("error", "?")).replace("\n", " ")
                print(f"{entry.get('messageId', '?')}  {entry.get('failedAt', '?')}  {entry.get('code', '?')}  "
                      f"{error[:100]}")  # fmt: skip
        if not args.json:
            print(f"({len(shown)} of {len(entries)} dead letter(s), newest first)")
        return errors.EXIT_OK
    if args.dead_command == "show":
        found = [entry for _, entry in entries if entry.get("messageId") == args.message_id]
        for entry in found:
            print(json.dumps(entry, indent=2))
        if not found:
            print(f"botworker dead: no dead letter {args.message_id}", file=sys.stderr)
        return errors.EXIT_OK if found else errors.EXIT_SEND_FAILED
    if bool(args.message_ids) == bool(args.all or getattr(args, "older_than", None)):
        print("botworker dead: name message ids, or --all" + (" or --older-than" if args.dead_command == "purge"
              else ""), file=sys.stderr)  # fmt: skip
        return errors.EXIT_USAGE
    chosen = [(s, e) for s, e in entries if args.all or e.get("messageId") in args.message_ids]
    if getattr(args, "older_than", None):
        try:
            cutoff = (datetime.now(UTC) - timedelta(seconds=_age_seconds(args.older_than))).isoformat()
        except ValueError as exc:
            print(f"botworker dead: {exc}", file=sys.stderr)
            return errors.EXIT_USAGE
        chosen = [(s, e) for s, e in entries if str(e.get("failedAt", "")) < cutoff]
    requeue = args.dead_command == "requeue"
    done = 0
    for stored, entry in chosen:
        if requeue:  # (an entry without its message has nothing to put back)
            done += entry.get("message") is not None and requeue_dead(client, stored, entry)
        else:
            done += purge_dead(client, stored)
    verb = "requeued" if requeue else "purged"
    print(f"{verb} {done} dead letter(s)")
    missing = set(args.message_ids) - {e.get("messageId") for _, e in chosen}
    if missing:
        print(f"botworker dead: no dead letter {', '.join(sorted(missing))}", file=sys.stderr)
    return errors.EXIT_SEND_FAILED if missing else errors.EXIT_OK


def _status(cfg: Config, as_json: bool) -> int:
    from .queue import connect, fleet_report, redis_health
    from .store import database_health

    client = connect(cfg, decode_responses=True, socket_timeout=cfg.redis_timeout)
    report = {**fleet_report(client), "redis": redis_health(client)}
    report["postgres"] = database_health(cfg.database_url, cfg.db_connect_timeout)
    nodes = report["nodes"]
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        rs, pg = report["redis"], report["postgres"]
        persist = "AOF on" if rs["aof"] else "AOF OFF: a restart loses the queue"
        print(f"redis: {rs['version']} {rs['role']}, {persist}, {rs['usedMemory']} used, ping {rs['pingMs']} ms")
        print(f"postgres: {pg['version']}, SELECT 1 in {pg['selectMs']} ms, {pg['fleetConnections']} fleet connection(s)"
              if pg["ok"] else f"postgres: UNREACHABLE ({pg['error']})")  # fmt: skip
        print(f"fleet: {'alive' if report['fleet'] else 'NOT RUNNING'}")
        print(f"queued: {report['queued']}   in flight: {report['inFlight']}   dead letters: {report['dead']}")
        print("totals: " + (", ".join(f"{k} {v}" for k, v in sorted(report["stats"].items())) or "none yet"))
        for node in sorted(nodes, key=lambda n: n["node"]):
            age = time.time() - node["updatedAt"]
            busy = sum(w.get("busyThreads", 0) for w in node["workers"])
            threads = sum(w.get("threads", 1) for w in node["workers"])
            print(
                f"node {node['node']} ({node['state']}, {len(node['workers'])}/{node['target']} workers, "
                f"{busy}/{threads} threads busy, seen {age:.0f}s ago)"
            )
            box = node.get("sandbox") or {}
            layers = ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in (box.get("layers") or {}).items())
            state = "ready" if box.get("ok") else f"UNAVAILABLE ({box.get('error')})"
            print(f"  sandbox: {state}{' WEAK MODE' if box.get('weak') else ''}{': ' + layers if layers else ''}")
            for w in node["workers"]:
                threads, busy = w.get("threads", 1), w.get("busyThreads", int(bool(w["busyFor"])))
                held = (
                    f"{busy}/{threads} threads busy (longest {w['busyFor']}s)" if busy else f"{threads} thread(s) idle"
                )
                print(f"  worker {w['wid']} pid {w['pid']}: {held}, {w['processed']} processed")
    alive = any(n["workers"] for n in nodes)
    return errors.EXIT_OK if alive else errors.EXIT_NO_WORKERS


def _send(cfg: Config, args: argparse.Namespace) -> int:
    from .client import send
    from .queue import connect

    client = connect(cfg, decode_responses=True, socket_timeout=cfg.redis_timeout)
    answer = send(client, args.bot, args.user, args.text, instance_id=args.instance, timeout=args.timeout)
    if answer is None:
        print(f"no answer within {args.timeout:g}s (is a worker running? try `botworker status`)", file=sys.stderr)
        return errors.EXIT_SEND_FAILED
    channel, event = answer
    if channel == "bot_errors":
        print(f"error [{event['code']}]: {event['error']}", file=sys.stderr)
        return errors.EXIT_SEND_FAILED
    print(event["botResponse"]["content"])
    print(f"(instance {event['instanceId']}, message {event['messageId']})", file=sys.stderr)
    return errors.EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
