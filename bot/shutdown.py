"""A graceful stop on SIGTERM and SIGINT (``docker stop``, systemd, Ctrl-C).

The first signal stops the intake and lets answers in flight finish for a grace period; then
the platforms disconnect, the database closes and the models save their KV states, and the
process exits with 0.  A second signal exits at once: SQLite's journal and the atomically
replaced state files keep everything consistent even then.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal

log = logging.getLogger(__name__)

EXIT_FORCED = 1  # the exit code of a second signal: stopped without waiting


class Shutdown:
    """Turns the first stop signal into an event and the second into an immediate exit."""

    def __init__(self) -> None:
        self.requested = asyncio.Event()
        self._early: signal.Signals | None = None

    def install_early(self) -> None:
        """Catch SIGTERM before the event loop runs (imports, settings, opening the
        database), so that a stop asked for during start-up is still a graceful one."""
        signal.signal(signal.SIGTERM, self._on_early_signal)

    def _on_early_signal(self, signum: int, _frame: object) -> None:
        self._early = signal.Signals(signum)

    def install(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        if self._early is not None:
            self._on_signal(self._early)

    def uninstall(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)

    def _on_signal(self, sig: signal.Signals) -> None:
        if self.requested.is_set():
            log.warning("%s again: stopping at once", sig.name)
            logging.shutdown()
            os._exit(EXIT_FORCED)
        log.info("%s: no new messages; finishing the answers in flight", sig.name)
        self.requested.set()
