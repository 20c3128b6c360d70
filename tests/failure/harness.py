"""The failure suite's harness: real workers, a closed-loop producer, faults, a Jepsen-style tally.

A `Scenario` starts worker subprocesses (``tests/apps/failure.py``), keeps them alive (a crashed
one is respawned, as a process supervisor would), and runs a producer that keeps ``window``
tasks outstanding (submitted, result not yet delivered) until ``tasks`` were submitted, the
faults are over, and ``TAIL`` more were submitted: a fault always hits a full window in flight,
and no test waits by a fixed sleep. Faults are injected at milestones of the submitted count.
Afterwards every task is classified the way RabbitMQ's Jepsen harness classifies messages:

- lost: its submit was confirmed, and it never ran (or its caller never got its outcome);
- duplicated: it ran more than once (allowed: a crash or a lost connection forces it);
- unexpected: it ran, but was never submitted;
- recovered: its submit raised `PublishError`, and it ran anyway (at-least-once publishing).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from aioqueue import App, DeadLetteredError, PublishError
from tests.conftest import WorkerProcess, wait_until
from tests.rabbit import RabbitNode


class SchedulerProcess(WorkerProcess):
    """A real ``python -m aioqueue.scheduler`` subprocess."""

    module = "aioqueue.scheduler"


APP_SPEC = "tests.apps.failure:app"
RESULT_TIMEOUT = 150.0
RESUMED_AFTER = 10  # results of tasks submitted after a fault that mean "service resumed"
TAIL = 300  # tasks submitted after the last fault
FIGURES: list[Figures] = []  # every scenario's figures, printed at the end of the session


@dataclass
class Figures:
    """What one scenario measured."""

    scenario: str
    submitted: int = 0
    confirmed: int = 0
    unconfirmed: int = 0
    executed: int = 0
    executions: int = 0
    lost: int = 0
    duplicated: int = 0
    duplicated_unmarked: int = 0
    unexpected: int = 0
    recovered: int = 0
    results: int = 0
    expected_results: int = 0
    poison: int = 0
    poison_dead_lettered: int = 0
    poison_runs: int = 0
    worker_crashes: int = 0
    faults: list[str] = field(default_factory=list)
    publish_errors: dict[str, int] = field(default_factory=dict)
    timeline: list[str] = field(default_factory=list)
    submit_bugs: list[str] = field(default_factory=list)
    worker_errors: int = 0  # "unexpected error" tracebacks in the workers' logs
    ticks: int = 0  # slots of the periodic task that ran (schedulers started only)
    tick_doubles: int = 0  # slots run twice, the second run not a redelivery: fired twice
    tick_gaps: list[str] = field(default_factory=list)  # slots missing between first and last
    wrong: list[str] = field(default_factory=list)  # a few tasks whose outcome was not expected
    outcome_kinds: dict[str, int] = field(default_factory=dict)
    elapsed: float = 0.0

    def line(self) -> str:
        poison = (
            f" poison={self.poison} dead-lettered={self.poison_dead_lettered} "
            f"poison-runs={self.poison_runs}"
            if self.poison
            else ""
        )
        return (
            f"{self.scenario}: submitted={self.submitted} confirmed={self.confirmed} "
            f"executed={self.executed} (runs {self.executions}) lost={self.lost} "
            f"duplicated={self.duplicated} (not marked redelivered: {self.duplicated_unmarked}) "
            f"unexpected={self.unexpected} "
            f"recovered={self.recovered} results={self.results}/{self.expected_results}"
            f"{poison} worker-crashes={self.worker_crashes} "
            f"faults=[{'; '.join(self.faults)}] elapsed={self.elapsed:.1f}s"
            + (f" publish-errors={dict(self.publish_errors)}" if self.publish_errors else "")
            + (
                f" scheduler: slots={self.ticks} fired-twice={self.tick_doubles} "
                f"missed={len(self.tick_gaps)}"
                if self.ticks
                else ""
            )
        )


class Scenario:
    """One run of the suite: workers, a producer, faults, and the tally."""

    def __init__(
        self,
        name: str,
        node: RabbitNode | None,
        directory: Path,
        *,
        url: str | None = None,
        workers: int = 3,
        concurrency: int = 20,
        tasks: int = 3000,
        window: int = 300,
        poison: frozenset[int] = frozenset(),
        queue_type: str = "classic",
        mix: bool = False,
        schedulers: int = 0,
    ) -> None:
        self.name = name
        self.node = node
        self.dir = directory
        url = url or (node.url if node is not None else None)
        assert url is not None, "a scenario needs a node or a URL"
        self.url = url
        self.queue_type = queue_type
        self.mix = mix  # every tenth task delayed, every tenth retried once
        self.n_schedulers = schedulers  # processes of the scheduler firing failure.tick
        self.result_timeout = RESULT_TIMEOUT  # how long a caller waits for its result
        self.queue = f"failure.{name}.{os.urandom(4).hex()}"
        self.n_workers = workers
        self.concurrency = concurrency
        self.tasks = tasks
        self.poison = poison
        self.figures = Figures(name, poison=len(poison))
        self.workers: list[WorkerProcess] = []
        self.schedulers: list[WorkerProcess] = []
        self._spawned = 0
        self._window = asyncio.Semaphore(window)
        self._submitted = 0
        self._confirmed: set[int] = set()
        self._unconfirmed: set[int] = set()
        self._outcomes: dict[int, str] = {}
        self._submitted_at: dict[int, float] = {}
        self._resulted: list[int] = []
        self._result_times: list[float] = []
        self._stopping = False
        self._end: int | None = None  # the producer's last task + 1, once the faults are over
        self._t0 = time.monotonic()

    # -- workers --------------------------------------------------------------------------

    def _env(self) -> dict[str, str]:
        return {
            "AIOQUEUE_BROKER_URL": self.url,
            "AIOQUEUE_TEST_QUEUE": self.queue,
            "AIOQUEUE_TEST_DIR": str(self.dir),
            "AIOQUEUE_TEST_QUEUE_TYPE": self.queue_type,
        }

    def spawn(self) -> WorkerProcess:
        args = ("--concurrency", str(self.concurrency), "--log-level", "WARNING")
        log = self.dir / f"worker-{self._spawned}.log"
        self._spawned += 1
        return WorkerProcess(APP_SPEC, *args, env=self._env(), log=log)

    def spawn_scheduler(self) -> WorkerProcess:
        log = self.dir / f"scheduler-{self._spawned}.log"
        self._spawned += 1
        return SchedulerProcess(APP_SPEC, "--log-level", "INFO", env=self._env(), log=log)

    async def _supervise(self) -> None:
        """Respawn crashed workers and schedulers, as systemd or Kubernetes would."""
        while not self._stopping:
            for k, worker in enumerate(self.workers):
                if worker.proc.poll() is not None and not self._stopping:
                    worker.kill()  # closes its log
                    self.figures.worker_crashes += 1
                    self.workers[k] = self.spawn()
            for k, scheduler in enumerate(self.schedulers):
                if scheduler.proc.poll() is not None and not self._stopping:
                    scheduler.kill()
                    self._event(f"scheduler exited {scheduler.proc.returncode}; respawned")
                    self.schedulers[k] = self.spawn_scheduler()
            # a supervisor's polling period, not a synchronisation
            await asyncio.sleep(0.1)  # sleep-ok

    def kill_worker(self) -> None:
        """``kill -9`` the longest-running live worker."""
        live = [w for w in self.workers if w.proc.poll() is None]
        os.kill(live[0].proc.pid, signal.SIGKILL)

    async def _stop_workers(self) -> None:
        self._stopping = True
        for scheduler in self.schedulers:  # first: no slot fires into stopped workers
            if scheduler.proc.poll() is None:
                scheduler.proc.send_signal(signal.SIGTERM)
        for scheduler in self.schedulers:
            code = await scheduler.wait_exit(timeout=90)
            assert code == 0, f"scheduler exited {code}:\n{scheduler.output()[-3000:]}"
        for worker in self.workers:
            # one respawned just now may still be starting: before its signal handlers are
            # installed, SIGTERM would kill it instead of asking it to finish
            await worker.wait_ready()
            if worker.proc.poll() is None:
                worker.proc.send_signal(signal.SIGTERM)
        for worker in self.workers:
            code = await worker.wait_exit(timeout=90)
            assert code == 0, f"worker exited {code}:\n{worker.output()[-3000:]}"

    # -- producer -------------------------------------------------------------------------

    async def _produce(self, app: App) -> None:
        """Submit ``tasks`` tasks at least, and go on until the faults are over and ``TAIL``
        more were submitted: a fault always hits a run in progress, however fast it is."""
        async with asyncio.TaskGroup() as tg:
            i = 0
            while i < self.tasks or self._end is None or i < self._end:
                await self._window.acquire()
                self._submitted += 1
                tg.create_task(self._one(app, i))
                i += 1

    async def _one(self, app: App, i: int) -> None:
        try:
            name = "failure.poison" if i in self.poison else "failure.record"
            countdown = None
            if self.mix and i % 10 == 3:
                countdown = 0.3  # through the delay queues
            elif self.mix and i % 10 == 7:
                name = "failure.retried"  # runs twice: a Retry, then the record
            started = time.monotonic()
            try:
                handle = await app.submit_with_options(name, (i,), countdown=countdown)
            except PublishError as exc:
                self._unconfirmed.add(i)
                text = f"{type(exc).__name__}: {exc}"[:200]
                errors = self.figures.publish_errors
                errors[text] = errors.get(text, 0) + 1
                self._event(f"submit of {i} (started {started - self._t0:.1f}s) raised {text}")
                return
            except Exception as exc:  # a bug: a submit raises PublishError or nothing
                self.figures.submit_bugs.append(f"{i}: {type(exc).__name__}: {exc}"[:200])
                return
            self._confirmed.add(i)
            self._submitted_at[i] = time.monotonic()
            try:
                value = await handle.result(timeout=self.result_timeout)
            except DeadLetteredError as exc:
                self._outcomes[i] = f"dead-lettered:{exc.reason}"
            except Exception as exc:
                self._outcomes[i] = f"error:{type(exc).__name__}:{exc}"
            else:
                self._outcomes[i] = "ok" if value == i else f"wrong:{value!r}"
            self._resulted.append(i)
            self._result_times.append(time.monotonic())
        finally:
            self._window.release()

    # -- faults ---------------------------------------------------------------------------

    async def at(self, fraction: float) -> None:
        """Wait until ``fraction`` of the tasks were submitted."""
        target = int(self.tasks * fraction)
        await wait_until(
            lambda: self._submitted >= target, timeout=RESULT_TIMEOUT, what=f"{target} submits"
        )

    async def fault(self, name: str, action: Callable[[], Awaitable[Any]]) -> None:
        """Inject a fault; then wait until tasks submitted after it have results again."""
        started = time.monotonic()
        self._event(f"{name} starts ({len(self._resulted)} results, {self._submitted} submitted)")
        await action()
        ended = time.monotonic()
        self._event(f"{name} ends ({len(self._resulted)} results, {self._submitted} submitted)")

        def resumed() -> bool:
            after = sum(1 for i in self._resulted[-RESUMED_AFTER * 4 :] if self._after(i, ended))
            return after >= RESUMED_AFTER

        await wait_until(resumed, timeout=RESULT_TIMEOUT, what=f"results after {name}")
        self.figures.faults.append(
            f"{name}: took {ended - started:.1f}s, no result for {self._gap(started):.1f}s, "
            f"resumed {time.monotonic() - ended:.1f}s after"
        )

    def _gap(self, since: float) -> float:
        """The longest time since ``since`` during which no caller got a result."""
        times = [since, *(t for t in self._result_times if t > since)]
        return max((b - a for a, b in itertools.pairwise(times)), default=0.0)

    def _event(self, text: str) -> None:
        self.figures.timeline.append(f"{time.monotonic() - self._t0:7.2f}s {text}")

    def _after(self, i: int, moment: float) -> bool:
        return self._submitted_at.get(i, 0.0) > moment

    def in_thread(self, fn: Callable[[], Any]) -> Callable[[], Awaitable[Any]]:
        """A blocking broker operation (rabbitmqctl) as a fault action, off the event loop."""
        return lambda: asyncio.to_thread(fn)

    # -- the run --------------------------------------------------------------------------

    async def run(self, faults: Callable[[Scenario], Awaitable[None]], app: App) -> Figures:
        """Run the producer against the workers while ``faults`` injects its faults."""
        started = time.monotonic()
        self.workers = [self.spawn() for _ in range(self.n_workers)]
        for worker in self.workers:
            await worker.wait_ready()
        self.schedulers = [self.spawn_scheduler() for _ in range(self.n_schedulers)]
        for scheduler in self.schedulers:
            await scheduler.wait_ready(timeout=120)
        supervisor = asyncio.ensure_future(self._supervise())
        try:
            async with app:
                producing = asyncio.ensure_future(self._produce(app))
                try:
                    await faults(self)
                    self._end = self._submitted + TAIL
                    await asyncio.wait_for(asyncio.shield(producing), RESULT_TIMEOUT * 2)
                finally:
                    if not producing.done():
                        producing.cancel()
                        await asyncio.gather(producing, return_exceptions=True)
        finally:
            self._stopping = True
            await asyncio.gather(supervisor, return_exceptions=True)
            try:
                await self._stop_workers()
            finally:  # whatever failed, no process of the scenario outlives it
                for process in (*self.workers, *self.schedulers):
                    process.kill()
        self.figures.elapsed = time.monotonic() - started
        self._tally()
        FIGURES.append(self.figures)
        (self.dir / "figures.json").write_text(json.dumps(asdict(self.figures), indent=2))
        print(f"\n[failure suite] {self.figures.line()}")
        return self.figures

    # -- the tally ------------------------------------------------------------------------

    def executions(self) -> tuple[Counter[int], Counter[int], Counter[int]]:
        """(runs of each task, runs marked redelivered, runs of each poison task)."""
        runs: Counter[int] = Counter()
        marked: Counter[int] = Counter()
        poison: Counter[int] = Counter()
        for path in self.dir.glob("exec-*.log"):
            for line in path.read_text().splitlines():
                if line.startswith("P"):
                    poison[int(line[1:])] += 1
                    continue
                i, redelivered = line.split()
                runs[int(i)] += 1
                marked[int(i)] += int(redelivered)
        return runs, marked, poison

    def _tally(self) -> None:
        f = self.figures
        runs, marked, poison_runs = self.executions()
        normal = self._confirmed - self.poison
        f.submitted = self._submitted
        f.confirmed = len(self._confirmed)
        f.unconfirmed = len(self._unconfirmed)
        f.executed = len(runs)
        f.executions = sum(runs.values())
        f.lost = sum(1 for i in normal if runs[i] == 0 or self._outcomes.get(i) != "ok")
        duplicated = [i for i, n in runs.items() if n > 1]
        f.duplicated = len(duplicated)
        # a run after the first that RabbitMQ (or our crash counter) did not mark as a
        # redelivery came from a publish retried after its confirm was lost
        f.duplicated_unmarked = sum(1 for i in duplicated if marked[i] < runs[i] - 1)
        attempted = self._confirmed | self._unconfirmed
        f.unexpected = sum(1 for i in runs if i not in attempted) + sum(
            1 for i in poison_runs if i not in attempted
        )
        f.recovered = sum(1 for i in self._unconfirmed if runs[i] or poison_runs[i])
        f.expected_results = len(self._confirmed)
        f.poison_dead_lettered = sum(
            1 for i in self.poison if self._outcomes.get(i) == "dead-lettered:poison"
        )
        f.results = sum(1 for i in normal if self._outcomes.get(i) == "ok")
        f.results += f.poison_dead_lettered
        f.poison_runs = sum(poison_runs.values())
        f.worker_errors = sum(
            path.read_text(errors="replace").count("unexpected error")
            for path in self.dir.glob("worker-*.log")
        )
        self._tally_ticks()
        f.wrong = [
            f"{i}: {outcome} (runs {runs[i]}, submitted at "
            f"{self._submitted_at.get(i, 0.0) - self._t0:.1f}s)"
            for i, outcome in self.wrong_outcomes(limit=40)
        ]
        kinds = Counter(
            o.split(":")[0] + ":" + o.split(":")[1] if ":" in o else o
            for o in self._outcomes.values()
        )
        f.outcome_kinds = dict(kinds)

    def _tally_ticks(self) -> None:
        """Slots of ``failure.tick``: fired twice (a second run not marked redelivered), and
        the ones missing between the first and the last that ran."""
        runs: Counter[str] = Counter()
        redelivered: Counter[str] = Counter()
        for path in self.dir.glob("ticks-*.log"):
            for line in path.read_text().splitlines():
                slot, marked = line.split()
                runs[slot] += 1
                redelivered[slot] += int(marked)
        f = self.figures
        f.ticks = len(runs)
        f.tick_doubles = sum(1 for s, n in runs.items() if n - redelivered[s] > 1)
        if runs:
            slots = sorted(datetime.fromisoformat(s) for s in runs)
            present = set(slots)
            moment, last = slots[0], slots[-1]
            while moment < last:
                moment += timedelta(seconds=1)
                if moment not in present:
                    f.tick_gaps.append(moment.isoformat())

    def wrong_outcomes(self, limit: int = 10) -> list[tuple[int, str]]:
        """A few tasks whose outcome was not the expected one (for failure messages)."""
        wrong = [
            (i, self._outcomes.get(i, "none"))
            for i in sorted(self._confirmed)
            if self._outcomes.get(i) != ("dead-lettered:poison" if i in self.poison else "ok")
        ]
        return wrong[:limit]


def check(scenario: Scenario, *, producer_faults: bool) -> None:
    """The suite's assertions, the same for every scenario."""
    f = scenario.figures
    assert f.submitted >= scenario.tasks
    assert not f.submit_bugs, f.submit_bugs[:5]
    assert f.worker_errors == 0, "a worker logged an unexpected error (see its log)"
    assert f.lost == 0, f"{f.lost} lost: {scenario.wrong_outcomes()}"
    assert f.unexpected == 0
    assert f.results == f.expected_results, scenario.wrong_outcomes()
    if not producer_faults:
        # only workers failed: every second run must be a redelivery
        assert f.duplicated_unmarked == 0
        assert f.unconfirmed == 0
