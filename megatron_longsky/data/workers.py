"""Worker processes for the data commands, and clean stops on Ctrl-C / SIGTERM.

``multiprocessing.Pool`` hangs when a signal to the process group kills a worker: an
idle worker holds the task queue's lock while it waits, and ``Pool.terminate()``
waits for that lock forever. :class:`OrderedProcessPool` avoids every such wait:
workers ignore Ctrl-C (the parent handles it), the parent polls its results with a
timeout and notices a dead worker, and on any exit it kills its workers outright.
Workers also leave on their own when the parent disappears (SIGKILL), so nothing is
orphaned.

:func:`stop_on_signals` turns SIGINT and SIGTERM into ``SystemExit`` in the main
thread, so ``finally`` blocks remove temporary outputs on the way out.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import pickle
import queue
import signal
import threading
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

log = logging.getLogger(__name__)

_POLL_S = 0.5


class WorkerError(RuntimeError):
    """A worker process died or could not start."""


@contextlib.contextmanager
def stop_on_signals(signals: Sequence[int] = (signal.SIGINT, signal.SIGTERM)):
    """Within the block, SIGINT/SIGTERM raise ``SystemExit(128 + signum)`` (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        log.warning("interrupted by %s: stopping and removing temporary files", signal.Signals(signum).name)
        raise SystemExit(128 + signum)

    previous = {sig: signal.signal(sig, handler) for sig in signals}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _picklable(exc: BaseException) -> BaseException:
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001 - any unpicklable exception is reported by its text
        return RuntimeError(f"{type(exc).__name__}: {exc}")


def _worker_main(task_q, result_q, initializer, initargs, func) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the parent handles it
    parent = multiprocessing.parent_process()
    try:
        if initializer is not None:
            initializer(*initargs)
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which raises it
        result_q.put((-1, False, _picklable(exc)))
        return
    while True:
        try:
            item = task_q.get(timeout=1.0)
        except queue.Empty:
            if parent is not None and not parent.is_alive():
                return  # the parent was killed: do not linger
            continue
        if item is None:
            return
        seq, payload = item
        try:
            result_q.put((seq, True, func(payload)))
        except BaseException as exc:  # noqa: BLE001 - the parent raises it in order
            result_q.put((seq, False, _picklable(exc)))


class OrderedProcessPool:
    """``workers`` spawned processes applying ``func`` to items; results in input order.

    At most ``window`` items are in flight (memory stays bounded on huge inputs). Use as
    a context manager: leaving the block (normally or by any exception, including the
    ``SystemExit`` of :func:`stop_on_signals`) stops every worker at once.
    """

    def __init__(self, workers: int, func: Callable[[Any], Any], initializer: Optional[Callable] = None,
                 initargs: tuple = (), window: Optional[int] = None):
        self.window = window or 4 * workers
        ctx = multiprocessing.get_context("spawn")
        self._tasks = ctx.Queue()
        self._results = ctx.Queue()
        self._procs = [ctx.Process(target=_worker_main, daemon=True,
                                   args=(self._tasks, self._results, initializer, initargs, func))
                       for _ in range(workers)]
        # SIGINT is blocked (not ignored) while the workers start: the children inherit the
        # blocked mask through exec, so a Ctrl-C during their start-up cannot print a
        # KeyboardInterrupt traceback from each of them, and in this process it stays pending
        # and is delivered when the mask is restored (an ignored one would be lost, and the
        # run would go on to finish as if never interrupted).
        # The mask is per thread: with other threads alive (a tqdm monitor, a queue feeder) the
        # kernel may hand the signal to one of them and Python would still run the handler in
        # this thread, mid-spawn. So the handler itself is also swapped for one that only
        # records the signal, which is raised again once every worker has started.
        main = threading.current_thread() is threading.main_thread()
        pending: list[int] = []
        if main:
            handler = signal.signal(signal.SIGINT, lambda signum, frame: pending.append(signum))
            previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            try:
                for proc in self._procs:
                    proc.start()
            finally:
                if main:  # a Ctrl-C that came meanwhile is recorded by now, then raised again
                    signal.pthread_sigmask(signal.SIG_SETMASK, previous)
                    signal.signal(signal.SIGINT, handler)
            if pending:
                signal.raise_signal(signal.SIGINT)  # the caller's handler: SystemExit / KeyboardInterrupt
        except BaseException:
            self.close(graceful=False)
            raise

    def __enter__(self) -> "OrderedProcessPool":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(graceful=exc_type is None)

    def _receive(self) -> tuple[int, bool, Any]:
        while True:
            try:
                return self._results.get(timeout=_POLL_S)
            except queue.Empty:
                for proc in self._procs:
                    if proc.exitcode is not None:
                        raise WorkerError(f"worker process {proc.pid} died (exit code {proc.exitcode}); "
                                          "out of memory or killed?") from None

    def imap(self, items: Iterable) -> Iterator:
        done: dict[int, tuple[bool, Any]] = {}
        sent = yielded = 0
        source = iter(items)
        exhausted = False
        while True:
            while not exhausted and sent - yielded < self.window:
                try:
                    item = next(source)
                except StopIteration:
                    exhausted = True
                    break
                self._tasks.put((sent, item))
                sent += 1
            if exhausted and yielded == sent:
                return
            while yielded not in done:
                seq, ok, value = self._receive()
                if seq < 0:
                    raise value  # a worker's initializer failed
                done[seq] = (ok, value)
            ok, value = done.pop(yielded)
            yielded += 1
            if not ok:
                raise value
            yield value

    def close(self, graceful: bool = True) -> None:
        procs = [proc for proc in self._procs if proc.pid is not None]  # started ones
        if graceful:
            for _ in procs:
                self._tasks.put(None)
            for proc in procs:
                proc.join(timeout=10)
        for proc in procs:
            if proc.is_alive():
                proc.kill()
        for proc in procs:
            proc.join(timeout=5)
        for q in (self._tasks, self._results):
            q.cancel_join_thread()  # never wait at exit to flush items no one will read
            q.close()


def ordered_map(func: Callable, items: Iterable, workers: int, initializer: Optional[Callable] = None,
                initargs: tuple = ()) -> Iterator:
    """``map(func, items)`` in order; ``workers > 1`` runs ``func`` in spawned processes
    (``initializer(*initargs)`` runs once in each), stopping them all on any exit."""
    if workers <= 1:
        yield from map(func, items)
        return
    with OrderedProcessPool(workers, func, initializer, initargs) as pool:
        yield from pool.imap(items)

