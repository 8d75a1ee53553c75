"""Driver-side progress: a terminal progress bar and the atomically replaced ``_status.json``."""

from __future__ import annotations

import os
import socket
import sys
import time
from datetime import datetime, timezone
from typing import Any

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from codelens.engine.run.rundir import RunDir


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class ProgressTracker:
    """Counts tokens and shards, shows a bar on a terminal, and keeps ``_status.json`` current.

    Args:
        run_dir: where ``_status.json`` lives.
        tokens_total: tokens of the whole job (committed earlier included).
        shards_total: shards of the whole job.
        tokens_done: tokens already committed before this run (resume).
        shards_done: shards already committed before this run.
        show_bar: draw a progress bar (default: when stderr is a terminal).
    """

    def __init__(
        self,
        run_dir: RunDir,
        *,
        tokens_total: int,
        shards_total: int,
        tokens_done: int = 0,
        shards_done: int = 0,
        show_bar: bool | None = None,
    ) -> None:
        self.run_dir = run_dir
        self.tokens_total = tokens_total
        self.shards_total = shards_total
        self.tokens_done = tokens_done
        self.shards_done = shards_done
        self.tokens_at_start = tokens_done
        self.started = time.monotonic()
        self.started_at = _now()
        self.failures: list[dict[str, Any]] = []
        self.retries = 0
        self.workers_alive: int | None = None
        self.state = "running"
        show = sys.stderr.isatty() if show_bar is None else show_bar
        self._bar: Progress | None = None
        if show:
            self._bar = Progress(
                TextColumn("[bold]lens"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("tokens  {task.fields[rate]} tok/s"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                TextColumn("{task.fields[extra]}"),
                transient=False,
            )
            self._task = self._bar.add_task(
                "lens", total=tokens_total, completed=tokens_done, rate="-", extra=""
            )

    def __enter__(self) -> ProgressTracker:
        if self._bar is not None:
            self._bar.start()
        self.write()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is not None and self.state == "running":
            self.state = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
            self.failures.append({"shard": None, "error": f"{type(exc).__name__}: {exc}"})
        self.write()
        if self._bar is not None:
            self._bar.stop()

    @property
    def tokens_per_s(self) -> float:
        """Tokens per second computed in this run (resumed tokens excluded)."""
        elapsed = time.monotonic() - self.started
        return (self.tokens_done - self.tokens_at_start) / elapsed if elapsed > 0 else 0.0

    def shard_done(self, n_tokens: int) -> None:
        """Record a committed shard."""
        self.tokens_done += n_tokens
        self.shards_done += 1
        self.write()

    def shard_failed(self, shard: int, error: str, *, final: bool) -> None:
        """Record a failed attempt (``final``: no more retries for this shard)."""
        if final:
            self.failures.append({"shard": shard, "error": error})
        else:
            self.retries += 1
        self.write()

    def finish(self, state: str) -> None:
        """Set the final state (done / failed)."""
        self.state = state
        self.write()

    def status(self) -> dict[str, Any]:
        """The content of ``_status.json``."""
        rate = self.tokens_per_s
        left = self.tokens_total - self.tokens_done
        return {
            "state": self.state,
            "tokens_total": self.tokens_total,
            "tokens_done": self.tokens_done,
            "shards_total": self.shards_total,
            "shards_done": self.shards_done,
            "tokens_per_s": round(rate, 2),
            "eta_s": round(left / rate, 1) if rate > 0 and self.state == "running" else None,
            "retries": self.retries,
            "workers_alive": self.workers_alive,
            "failures": self.failures,
            "started_at": self.started_at,
            "updated_at": _now(),
            "host": socket.gethostname(),
            "pid": os.getpid(),
        }

    def write(self) -> None:
        """Replace ``_status.json`` and refresh the bar."""
        self.run_dir.write_status(self.status())
        if self._bar is not None:
            extra = []
            if self.workers_alive is not None:
                extra.append(f"workers {self.workers_alive}")
            if self.retries:
                extra.append(f"retries {self.retries}")
            if self.failures:
                extra.append(f"failed {len(self.failures)}")
            self._bar.update(
                self._task,
                completed=self.tokens_done,
                rate=f"{self.tokens_per_s:,.0f}",
                extra="  ".join(extra),
            )
