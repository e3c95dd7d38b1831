"""Stopping a run at a step boundary, so that it can save a checkpoint and exit 0.

SIGTERM is what Cloud TPU and GKE send before preempting a VM or pod; a first Ctrl-C asks for the same (a
second one interrupts at once). Both only set a flag that the loop reads between steps: a signal that arrived
mid-step never leaves half-updated state behind.

Only for single-process runs: with several processes, a local flag would stop the processes at different
steps. There `jax.distributed` runs JAX's preemption service, which catches SIGTERM itself and makes
`multihost_utils.reached_preemption_sync_point(step)` true on every process at the same step
(`Checkpoints.reached_preemption`).
"""

from __future__ import annotations

import signal
import threading


class StopRequest:
    """Turns SIGTERM and a first SIGINT into `requested` between `install()` and `uninstall()`."""

    def __init__(self, enabled: bool = True):
        # Python only lets the main thread install signal handlers.
        self._enabled = enabled and threading.current_thread() is threading.main_thread()
        self._event = threading.Event()
        self._previous: dict[int, object] = {}
        self.signal_name: str | None = None

    @property
    def requested(self) -> bool:
        return self._event.is_set()

    def _handle(self, signum, frame) -> None:
        self.signal_name = signal.Signals(signum).name
        self._event.set()
        if signum == signal.SIGINT:  # a second Ctrl-C raises KeyboardInterrupt as usual
            signal.signal(signal.SIGINT, self._previous.pop(signal.SIGINT))

    def install(self) -> StopRequest:
        if self._enabled:
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def uninstall(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
