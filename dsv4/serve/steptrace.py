"""A timeline of engine steps, one JSON line per step, cheap enough to leave on under load: where a load level's
wall time went (steps of each kind, their host and wait parts, the idle time between them, short batches).

The engine marks points of each step on the host clock (`time.perf_counter`); nothing here touches the device,
so tracing adds no synchronisation. Lines are buffered and written every `flush_every` steps and at `close()`.
The first line is a header ({"header": {...}}: the engine's settings and the clock's origin); each later line is a
step:

  t         wall-clock start (Unix seconds)
  ms        the step, start to end
  idle_ms   since the previous step ended (the engine waiting for work, or for the GIL, between steps)
  host_ms   start of the step to the decode's launch (cancellations, the decode's host-side set-up); null when the
            step ran no decode
  wait_ms   the step's waits for device results (token copies to the host); with overlap, the wait for the
            previous step's results while this step's decode runs
  deliver_ms  handing results out (stop checks, events pushed to streams), waits excluded
  save_ms   prefix-cache saves at requests' ends: the row-state copies taken when they end (within deliver_ms)
            and the saves stored after the step's launches
  cpu_ms    the engine thread's CPU time in the step outside its waits for device results: ms - wait_ms - cpu_ms is
            time the thread was runnable but not running (another thread held the GIL: the HTTP server's event
            loop; or the OS ran something else), which host-side savings in the engine cannot recover
  decode_rows  rows the decode fed (live requests; free rows riding along excluded), graph: the decode replayed a
            CUDA graph (its bucket), prefill_tokens / prefill_rows / prefill_forwards: the prompt chunks run
  emitted   tokens handed to request streams; finished: requests that ended; queue: requests waiting for a row
            after the step; running: rows held after the step; pending: step results not yet handed out

`bench/engine_trace.py FILE` summarises a trace.
"""
from __future__ import annotations

import json
import time
from typing import IO

__all__ = ["StepTrace"]


class StepTrace:
    """Collects one record per engine step and appends it to `path` as a JSON line (see the module doc)."""

    def __init__(self, path: str, header: dict | None = None, flush_every: int = 256):
        self._file: IO[str] = open(path, "w")
        self._lines: list[str] = [json.dumps({"header": dict(header or {}, time=time.time(),
                                                             perf_counter=time.perf_counter())})]
        self.flush_every = flush_every
        self._last_end: float | None = None
        self.rec: dict | None = None
        self._t0 = self._c0 = self._wait_cpu = 0.0

    def begin(self) -> None:
        now = time.perf_counter()
        self._t0, self._c0, self._wait_cpu = now, time.thread_time(), 0.0
        self.rec = dict(t=round(time.time(), 6), ms=0.0,
                        idle_ms=None if self._last_end is None else round(1e3 * (now - self._last_end), 3),
                        host_ms=None, wait_ms=0.0, deliver_ms=0.0, save_ms=0.0, decode_rows=0, graph=None,
                        prefill_tokens=0, prefill_rows=0, prefill_forwards=0, emitted=0, finished=0)

    def launch(self) -> None:
        """The step's decode is about to be launched (the first call of a step counts)."""
        if self.rec is not None and self.rec["host_ms"] is None:
            self.rec["host_ms"] = round(1e3 * (time.perf_counter() - self._t0), 3)

    def waited(self, wall_s: float, cpu_s: float) -> None:
        """A wait for device results: `wall_s` seconds, of which the thread spent `cpu_s` on the CPU (a CUDA event's
        synchronize may spin), kept out of cpu_ms."""
        if self.rec is not None:
            self.rec["wait_ms"] += 1e3 * wall_s
            self._wait_cpu += cpu_s

    def add(self, key: str, value) -> None:
        if self.rec is not None:
            self.rec[key] += value

    def set(self, key: str, value) -> None:
        if self.rec is not None:
            self.rec[key] = value

    def end(self, **fields) -> None:
        now = time.perf_counter()
        rec, self.rec = self.rec, None
        if rec is None:
            return
        rec.update(fields)
        rec["ms"] = round(1e3 * (now - self._t0), 3)
        rec["cpu_ms"] = round(1e3 * (time.thread_time() - self._c0 - self._wait_cpu), 3)
        rec["wait_ms"] = round(rec["wait_ms"], 3)
        rec["deliver_ms"] = round(rec["deliver_ms"], 3)
        rec["save_ms"] = round(rec["save_ms"], 3)
        self._last_end = now
        self._lines.append(json.dumps(rec, separators=(",", ":")))
        if len(self._lines) >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        if self._lines and not self._file.closed:
            self._file.write("\n".join(self._lines) + "\n")
            self._file.flush()
        self._lines = []

    def close(self) -> None:
        self.flush()
        self._file.close()
