"""Periodic cache refresh (HPS `refresh_delay` / `refresh_interval`; in HPS its Triton backend drove it, here the server
does): one daemon thread per server re-reads the dynamically cached rows of each model that asks for it from the tiers
(`HierarchicalParameterServer.refresh`), first `delay` seconds after start, then every `interval` seconds."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

log = logging.getLogger(__name__)


class PeriodicRefresher:
    def __init__(self, server: Any) -> None:
        self._server = server
        self._due: dict[str, float] = {}  # model -> monotonic time of its next refresh
        self._interval: dict[str, float] = {}
        self._cond = threading.Condition()
        self._stop = False
        self.refreshes = 0  # completed refresh passes (all models)
        self.keys_refreshed = 0
        self.errors = 0
        self._thread = threading.Thread(target=self._run, name="hps-refresher", daemon=True)
        self._thread.start()

    def schedule(self, model: str, delay_s: float, interval_s: float) -> None:
        """Refresh `model` every interval_s seconds, the first time delay_s from now; interval 0 stops it."""
        with self._cond:
            if interval_s <= 0:
                self._due.pop(model, None)
                self._interval.pop(model, None)
            else:
                self._due[model] = time.monotonic() + max(delay_s, 0.0)
                self._interval[model] = interval_s
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stop:
                    now = time.monotonic()
                    due = [m for m, t in self._due.items() if t <= now]
                    if due:
                        break
                    wait = min(self._due.values()) - now if self._due else None
                    self._cond.wait(wait)
                if self._stop:
                    return
                for m in due:  # the next pass is due one interval after this one starts
                    self._due[m] = now + self._interval[m]
            for model in due:
                try:
                    self.keys_refreshed += self._server.refresh(model)
                    self.refreshes += 1
                except KeyError:  # the model was removed: nothing left to refresh
                    self.schedule(model, 0.0, 0.0)
                except Exception:  # noqa: BLE001 - a failed pass must not end the schedule
                    self.errors += 1
                    log.exception("periodic refresh of model %r failed", model)
