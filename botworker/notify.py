"""systemd's service notification protocol (sd_notify(3)), spoken by the supervisor: readiness, status, reloading,
stopping and watchdog pings, each one datagram of ``KEY=value`` lines to the socket systemd names in
``NOTIFY_SOCKET`` (``Type=notify`` units). Without that variable every call does nothing, so the same code runs
under systemd, by hand and in tests."""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import MutableMapping

log = logging.getLogger(__name__)

_VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


class Notifier:
    """The supervisor's line to systemd. ``from_environment`` takes the variables out of the environment, so that
    the worker processes forked later never see them (as sd_notify's ``unset_environment`` does)."""

    def __init__(self, address: str | None, watchdog_usec: int | None = None) -> None:
        # An address starting with "@" is in the abstract namespace.
        self.address = "\0" + address[1:] if address and address.startswith("@") else address
        # Ping at half the interval systemd allows, as sd_watchdog_enabled(3) advises.
        self.watchdog_every = watchdog_usec / 2e6 if watchdog_usec else None
        self._last_ping = 0.0
        self._last_status = ""
        self._failed = False

    @classmethod
    def from_environment(cls, environ: MutableMapping[str, str] | None = None) -> Notifier:
        env = os.environ if environ is None else environ
        values = {name: env.pop(name, None) for name in _VARIABLES}
        usec = values["WATCHDOG_USEC"]
        pid = values["WATCHDOG_PID"]
        ours = not pid or (pid.isdigit() and int(pid) == os.getpid())
        return cls(values["NOTIFY_SOCKET"], int(usec) if usec and usec.isdigit() and ours else None)

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def send(self, **fields: str) -> bool:
        """One datagram; a failure is logged once (systemd gone, or a wrong socket) and never raised."""
        if not self.address:
            return False
        payload = "".join(f"{key}={value}\n" for key, value in fields.items()).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(payload, self.address)
        except OSError as exc:
            if not self._failed:
                log.warning("cannot notify systemd at %r: %s", self.address, exc)
            self._failed = True
            return False
        self._failed = False
        return True

    def ready(self, status: str) -> None:
        self._last_status = status
        self.send(READY="1", STATUS=status, MAINPID=str(os.getpid()))

    def reloading(self) -> None:
        # MONOTONIC_USEC lets systemd 253+ (Type=notify-reload) match the reload to its request; older ones ignore it.
        self.send(RELOADING="1", MONOTONIC_USEC=str(time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000))

    def stopping(self, status: str) -> None:
        self.send(STOPPING="1", STATUS=status)

    def status(self, text: str) -> None:
        """STATUS= when it changed."""
        if text != self._last_status:
            self._last_status = text
            self.send(STATUS=text)

    def watchdog(self) -> None:
        """WATCHDOG=1 at most every half interval; the caller pings only while the service is healthy."""
        if self.watchdog_every is None:
            return
        now = time.monotonic()
        if now - self._last_ping >= self.watchdog_every:
            self._last_ping = now
            self.send(WATCHDOG="1")
