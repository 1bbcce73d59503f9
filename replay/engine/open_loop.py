"""Open-loop dispatch: each request goes at `t0 + intended_s` on one monotonic clock.

The engine sees only the `Target` interface and a sink for finished records. It never shifts a
request in time silently: a late timer shows as dispatch lag, a concurrency-cap wait shows as
send lag (and in every "intended"-based latency), a request the run never reached is recorded
`not_sent` with its reason. Every scheduled request reaches the sink exactly once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from replay.core import errors
from replay.core.request import ABANDONED, ERROR, NOT_SENT, OK, UNFINISHED, Request, RequestRecord, record_for
from replay.core.target import Target
from replay.engine.lookahead import LookAhead, wake

Sink = Callable[[RequestRecord], None]
# A request's successor, made when it ends (a session's next turn): (request, its end in run-relative
# seconds, output tokens the server reported) -> the next request, its intended time set, or None.
FollowUp = Callable[[Request, float, int], "Request | None"]
# The successors a chain will never make because this request did not end ok or was not sent (a
# session's later turns): (request, run-relative time the chain broke) -> requests, each recorded
# not_sent (`session_ended` after a turn that failed, was abandoned or left unfinished; the same
# reason as the request's own when it was not sent), so every turn a session would have had is counted.
Remainder = Callable[[Request, float], Iterable[Request]]
EARLY_S = 0.0002
# At the drain deadline, in-flight requests are cancelled this many per loop turn: thousands at
# once (an overloaded run) would run their cancellation handlers in one long loop iteration.
CANCEL_CHUNK = 16


@dataclass(frozen=True, slots=True)
class EngineOptions:
    concurrency_cap: int | None = None  # at most this many in flight; the rest wait (counted)
    drain_timeout_s: float = 60.0  # after the last dispatch, how long in-flight requests may finish
    worker: int = 0
    # Outstanding requests (in flight or waiting for the cap) beyond which new ones are not sent
    # but counted `not_sent: max_in_flight`: an overloaded server must not exhaust the client's
    # sockets and memory (each request holds a connection). None: unbounded.
    max_in_flight: int | None = None
    # Requests (prompts, the target's body) are made ready up to this far ahead of their send time,
    # holding at most look_ahead_bytes (see lookahead.py).
    look_ahead_s: float = 2.0
    look_ahead_bytes: int = 256 << 20
    follow_up: FollowUp | None = None
    remainder: Remainder | None = None


@dataclass(slots=True)
class EngineState:
    """Live counters for progress displays and time series (read-only for others)."""

    dispatched: int = 0
    finished: int = 0
    in_flight: int = 0
    waiting_for_cap: int = 0
    ok: int = 0
    errors: int = 0
    not_sent: int = 0
    abandoned: int = 0  # cancelled by the client on purpose (Request.abandon_after_s)
    prepared_late: int = 0  # requests the look-ahead made ready only after their send time
    draining_since: float = 0.0  # perf_counter when dispatching ended and the drain began (0: not yet)


class Engine:
    def __init__(self, target: Target, sink: Sink, options: EngineOptions | None = None) -> None:
        self.target = target
        self.sink = sink
        self.options = options or EngineOptions()
        self.state = EngineState()
        self._sem = asyncio.Semaphore(self.options.concurrency_cap) if self.options.concurrency_cap else None
        self._tasks: set[asyncio.Task[None]] = set()
        self._emptied: asyncio.Future[None] | None = None  # set when the last in-flight task ends
        self._stopping = False
        self._dispatcher: asyncio.Task[None] | None = None
        self._ahead: LookAhead | None = None
        self._t0 = 0.0
        self._drain_expired = False  # cancellations from now on are the drain deadline's

    def stop(self) -> None:
        """Stop dispatching now; requests not yet sent are recorded `not_sent: stopped`."""
        self._stopping = True
        if self._dispatcher is not None and not self._dispatcher.done():
            self._dispatcher.cancel()

    async def prime(self, schedule: Iterable[Request]) -> None:
        """Make the schedule's first `look_ahead_s` ready before the run's clock starts; `run()`
        with the same schedule then goes on from there (a burst at t = 0 is ready too)."""
        self._ahead = self._look_ahead(schedule, None)
        await self._ahead.primed()

    def _look_ahead(self, schedule: Iterable[Request], t0: float | None) -> LookAhead:
        o = self.options
        prepare = getattr(self.target, "prepare", None)  # optional part of the Target protocol
        ahead = LookAhead(schedule, prepare, t0, o.look_ahead_s, o.look_ahead_bytes)
        ahead.start()
        return ahead

    async def run(self, schedule: Iterable[Request], t0: float) -> None:
        """Dispatch the whole schedule against `t0` (a `time.perf_counter()` value), then drain."""
        self._t0 = t0
        ahead = self._ahead
        if ahead is not None and ahead.schedule is schedule:
            ahead.clock_started(t0)
        else:
            ahead = self._ahead = self._look_ahead(schedule, t0)
        self._dispatcher = asyncio.ensure_future(self._dispatch(ahead))
        try:
            await self._dispatcher
        except asyncio.CancelledError:
            if not self._stopping:  # cancelled from outside, not by stop(): propagate
                raise
        finally:
            await ahead.close()
            self.state.prepared_late = ahead.late
        # Whatever the dispatcher did not reach is counted, never dropped.
        for req in ahead.rest():
            self._not_sent(req, errors.NOT_SENT_STOPPED)
        self.state.draining_since = time.perf_counter()
        await self._drain()

    async def _dispatch(self, ahead: LookAhead) -> None:
        loop = asyncio.get_running_loop()
        t0 = self._t0
        pending: Request | None = None
        try:
            while (req := await ahead.next()) is not None:
                pending = req
                due = t0 + req.intended_s
                # One absolute deadline per request, never a chain of relative sleeps. Loop timers
                # have ~1 ms granularity and can fire up to 1 ms early: sleep again while more than
                # EARLY_S remains, so a send is never early by more than that (nor spins for long).
                while (delay := due - time.perf_counter()) > EARLY_S:
                    await asyncio.sleep(delay)
                if self._stopping:
                    break
                limit = self.options.max_in_flight
                if limit is not None and len(self._tasks) >= limit:
                    pending = None
                    self._not_sent(req, errors.NOT_SENT_OVERLOAD)
                    continue
                rec = record_for(req)
                rec.worker = self.options.worker
                rec.dispatch_s = time.perf_counter()
                pending = None
                task = loop.create_task(self._one(req, rec))
                self._tasks.add(task)
                task.add_done_callback(self._task_done)
                self.state.dispatched += 1
        finally:
            if pending is not None:
                self._not_sent(pending, errors.NOT_SENT_STOPPED)

    async def _one(self, req: Request, rec: RequestRecord) -> None:
        st = self.state
        leave = None if req.abandon_after_s is None else self._leave_at(req)
        try:
            if self._sem is not None:
                st.waiting_for_cap += 1
                try:
                    await self._sem.acquire()
                finally:
                    st.waiting_for_cap -= 1
            st.in_flight += 1
            try:
                rec.sent_s = time.perf_counter()
                rec.status = OK
                await self.target.send(req, rec)
            finally:
                st.in_flight -= 1
                if self._sem is not None:
                    self._sem.release()
        except asyncio.CancelledError:
            if leave is not None and leave.fired and not self._drain_expired:
                _abandoned(rec)  # the drawn patience ran out: the client left on purpose
            elif self._drain_expired and rec.sent_s is None:  # still waiting for the concurrency cap
                rec.status, rec.error = NOT_SENT, errors.NOT_SENT_DEADLINE
            elif self._drain_expired:
                rec.status = UNFINISHED
                rec.error_detail = f"in flight at the drain deadline ({self.options.drain_timeout_s:g} s)"
            else:
                _fail(rec, errors.CANCELLED, "cancelled by the client (second signal)")
        except Exception as exc:  # a target bug must not lose the record
            _fail(rec, errors.TARGET_ERROR, f"{type(exc).__name__}: {exc}")
        if leave is not None:
            leave.cancel()
        follow = self.options.follow_up
        nxt = None
        if follow is not None and rec.status == OK and rec.end_s is not None:
            nxt = follow(req, rec.end_s - self._t0, rec.output_tokens)
        self._finish(rec)
        if nxt is not None:
            self._submit(nxt)
        elif rec.status != OK:  # the user does not go on after a failed, abandoned or unfinished turn
            at = rec.end_s if rec.end_s is not None else time.perf_counter() - self._t0
            why = rec.error if rec.status == NOT_SENT and rec.error else errors.NOT_SENT_SESSION_ENDED
            self._rest_not_sent(req, why, at)

    def _submit(self, req: Request) -> None:
        """A request made during the run (a follow-up): sent at its own intended time, like the
        schedule's, its dispatch lag measured against that time."""
        if self._stopping or self._drain_expired:
            self._not_sent(req, errors.NOT_SENT_STOPPED)
            return
        task = asyncio.get_running_loop().create_task(self._later(req))
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    async def _later(self, req: Request) -> None:
        due = self._t0 + req.intended_s
        prepare = getattr(self.target, "prepare", None)
        if prepare is not None and req.prepared is None and due - time.perf_counter() > EARLY_S:
            req.prepared = prepare(req)  # the body made during the think time, not at the send
        try:
            while (delay := due - time.perf_counter()) > EARLY_S:
                await asyncio.sleep(delay)
        except asyncio.CancelledError:
            self._not_sent(req, errors.NOT_SENT_DEADLINE if self._drain_expired else errors.NOT_SENT_STOPPED)
            return
        if self._stopping:
            self._not_sent(req, errors.NOT_SENT_STOPPED)
            return
        rec = record_for(req)
        rec.worker = self.options.worker
        rec.dispatch_s = time.perf_counter()
        self.state.dispatched += 1
        await self._one(req, rec)

    def _leave_at(self, req: Request) -> _Leave:
        """A timer that cancels this request's task at intended + abandon_after (a user's patience runs
        from when they asked, a concurrency-cap wait included)."""
        task = asyncio.current_task()
        assert task is not None and req.abandon_after_s is not None
        return _Leave(task, self._t0 + req.intended_s + req.abandon_after_s)

    def _finish(self, rec: RequestRecord) -> None:
        if rec.end_s is None and rec.status not in (NOT_SENT, UNFINISHED) and rec.sent_s is not None:
            rec.end_s = time.perf_counter()
        rec.finish_tokens()
        rec.rebase(self._t0)
        st = self.state
        st.finished += 1
        if rec.status == OK:
            st.ok += 1
        elif rec.status == ERROR:
            st.errors += 1
        elif rec.status == ABANDONED:
            st.abandoned += 1
        self.sink(rec)

    def _not_sent(self, req: Request, reason: str) -> None:
        self._record_not_sent(req, reason)
        self._rest_not_sent(req, reason, req.intended_s)

    def _record_not_sent(self, req: Request, reason: str) -> None:
        rec = record_for(req)
        rec.worker = self.options.worker
        rec.status = NOT_SENT
        rec.error = reason
        self.state.not_sent += 1
        self.sink(rec)

    def _rest_not_sent(self, req: Request, reason: str, at_s: float) -> None:
        """What `req`'s chain would have sent after it, counted not_sent (see `Remainder`)."""
        rest = self.options.remainder
        if rest is not None:
            for later in rest(req, at_s):
                self._record_not_sent(later, reason)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not self._tasks and self._emptied is not None and not self._emptied.done():
            self._emptied.set_result(None)

    async def _until_empty(self, timeout_s: float | None) -> None:
        """Until no request is in flight (or `timeout_s`): one future the last task's completion sets,
        O(1) however many are in flight. asyncio.wait over them all adds and then removes a callback
        on each: with 10,000 in flight (an overloaded run) that was tens of ms on the loop, twice."""
        if not self._tasks:
            return
        loop = asyncio.get_running_loop()
        self._emptied = fut = loop.create_future()
        timer = None if timeout_s is None else loop.call_later(timeout_s, wake, fut)
        try:
            await fut
        finally:
            self._emptied = None
            if timer is not None:
                timer.cancel()

    async def _drain(self) -> None:
        deadline = time.perf_counter() + self.options.drain_timeout_s
        while self._tasks:  # follow-ups made while draining are waited for too
            left = deadline - time.perf_counter()
            if left <= 0:
                break
            await self._until_empty(left)
        if not self._tasks:
            return
        # Requests still in flight now are counted unfinished: the server did not get to them in time.
        self._drain_expired = True
        tasks = list(self._tasks)
        for i in range(0, len(tasks), CANCEL_CHUNK):
            for task in tasks[i : i + CANCEL_CHUNK]:
                task.cancel()
            await asyncio.sleep(0)
        while self._tasks:
            await self._until_empty(None)

    def cancel_in_flight(self) -> None:
        """Second signal: end every in-flight request now (each is recorded client_cancelled)."""
        for task in list(self._tasks):
            task.cancel()


class _Leave:
    """One request's abandon timer; `fired` tells `_one` that a cancellation is the client leaving.
    Loop timers can fire up to ~1 ms early: like the dispatcher, it re-arms until within EARLY_S."""

    __slots__ = ("task", "due", "handle", "fired")

    def __init__(self, task: asyncio.Task[None], due: float) -> None:
        self.task = task
        self.due = due  # perf_counter
        self.fired = False
        self.handle = self._arm()

    def _arm(self) -> asyncio.TimerHandle:
        return asyncio.get_running_loop().call_later(max(0.0, self.due - time.perf_counter()), self.fire)

    def fire(self) -> None:
        if self.task.done():
            return
        if self.due - time.perf_counter() > EARLY_S:
            self.handle = self._arm()
            return
        self.fired = True
        self.task.cancel()

    def cancel(self) -> None:
        self.handle.cancel()


def _abandoned(rec: RequestRecord) -> None:
    """Status abandoned, whatever the target recorded for the cancellation; `end_s` is when it left."""
    task = asyncio.current_task()
    if task is not None:
        task.uncancel()
    when = "mid-stream" if rec.first_token_s is not None else "before the first token"
    rec.status, rec.error = ABANDONED, None
    rec.error_detail = f"the client left {rec.abandon_after_s:.3f} s after the intended send, {when}"
    if rec.end_s is None:
        rec.end_s = time.perf_counter()


def _fail(rec: RequestRecord, kind: str, detail: str) -> None:
    rec.status = ERROR
    rec.error = kind
    rec.error_detail = detail[:200]
