"""Admission: which waiting prompts join the batch, and when. Token-level continuous batching.

    while prompts remain or any is in flight:
      admit    waiting prompts, oldest first, while they fit (:func:`fits`)
      tick     everything in flight advances one token (mahalo.engine.controller)
      yield    the prompts that ended; their slots are free at the next token

One rule (:func:`fits`) for the library's :func:`schedule` and the threaded :class:`Engine`:
admission is governed by a budget of *decoding* rows (``batch.max_rows``: rows fed at the next
token, plus those promised to prompts still prefilling), not by prompts in flight. Rows that ended
their step and wait for their siblings hold only their step's KV and do not count, so more
prompts join to keep the batch full; ``batch.max_prompts`` caps prompts in flight (and the KV
they hold). With ``engine.step_barrier`` (the lockstep ablation) prompts join only between
global steps, up to ``max_prompts`` and ``max_rows`` rows held.

Prompts are read lazily from any iterable, so a dataset streams through; results come back as
they finish, each with its input index. :class:`Engine` is the same loop fed from other threads
(a server's requests, a Ray replica's batches): callers submit prompts at any time and wait on
futures; a request starts at the next token.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future

import torch

from mahalo.chat import as_messages
from mahalo.config import GuideConfig
from mahalo.engine.controller import Controller
from mahalo.engine.rows import Plan, Prompt
from mahalo.result import GuidedResult

# batch.max_prompts / batch.max_rows when 0: (prompts in flight, decoding rows) by the policy's
# device. CPU: benchmarks/throughput.py on the 2-core sandbox (benchmarks/README.md §4). GPU: not
# measured (no GPU was lent to this project yet): 256 rows keep an 8B decode step near its
# weight-read floor (benchmarks/gpu_check.py's roofline).
DEVICE_LIMITS = {"cpu": (64, 256), "cuda": (256, 256)}

log = logging.getLogger(__name__)


def device_limits(device: str, barrier: bool, max_prompts: int, max_rows: int) -> tuple[int, int]:
    """(prompts in flight, rows): the ones asked for, or the defaults of a ``device`` type (cpu,
    cuda) for 0 (with a step barrier, ``max_rows=0`` means no bound on rows held)."""
    prompts, rows = DEVICE_LIMITS.get(device, DEVICE_LIMITS["cpu"])
    return max_prompts or prompts, max_rows or (0 if barrier else rows)


def limits(controller: Controller, max_prompts: int, max_rows: int) -> tuple[int, int]:
    """:func:`device_limits` for ``controller``'s policy device and step barrier."""
    device = torch.device(getattr(controller.policy, "device", "cpu")).type
    return device_limits(device, controller.barrier, max_prompts, max_rows)


def fits(controller: Controller, plans: list[Plan], max_prompts: int, max_rows: int) -> bool:
    """May prompts searched by ``plans`` all join now (with what is already in flight)?

    One prompt always may, when nothing is in flight; else prompts in flight stay within
    ``max_prompts`` and decoding rows (the first step's B*N of each joining prompt) within
    ``max_rows``; with a step barrier, only between global steps and within ``max_rows`` rows held.
    """
    prompts = controller.in_flight + len(plans)
    if prompts <= 1:
        return True
    if prompts > max_prompts:
        return False
    rows = sum(p.rows for p in plans)
    if controller.barrier:
        return controller.between_steps and (not max_rows or controller.rows_held + rows <= max_rows)
    return controller.decoding_rows + rows <= max_rows


def schedule(
    controller: Controller, prompts: Iterable[object], max_prompts: int = 0, max_rows: int = 0
) -> Iterator[tuple[int, GuidedResult | ValueError]]:
    """Decode ``prompts`` (strings or message lists) within ``max_prompts`` prompts in flight and
    ``max_rows`` decoding rows (0: the device's defaults).

    Yields:
        (input index, result) as each prompt finishes, or (input index, ValueError) for a prompt
        that failed (a malformed or too long prompt, a reward model's fault).
    """
    max_prompts, max_rows = limits(controller, max_prompts, max_rows)
    waiting = enumerate(prompts)
    head: tuple[int, object] | None = None  # the next prompt, read but not yet admitted
    exhausted = False
    while True:
        batch: list[tuple[int, object]] = []
        while True:
            if head is None and not exhausted:
                item = next(waiting, None)
                if item is None:
                    exhausted = True
                else:
                    try:
                        head = (item[0], as_messages(item[1]))
                    except ValueError as err:
                        yield item[0], err
                        continue
            if head is None or not fits(controller, [controller.default] * (len(batch) + 1), max_prompts, max_rows):
                break
            batch.append(head)
            head = None
        if batch:
            yield from controller.admit(batch)
        if not controller.in_flight:
            if exhausted and head is None:
                return
            continue
        yield from controller.tick()


class EngineStopped(RuntimeError):
    """The engine's thread has stopped (closed, or an unexpected error); nothing more is decoded."""


class Busy(RuntimeError):
    """More prompts are pending than the caller's limit allows (a server's ``max_queue``)."""


class Engine:
    """Continuous batching for prompts that arrive over time, from any thread.

    A background thread runs the scheduler's loop (admit what fits, tick, hand back what ended);
    :meth:`submit` queues a prompt and returns a future of its ``GuidedResult``, or of its
    ``ValueError`` for a prompt that failed (a :class:`~mahalo.result.PromptError` when it was
    refused before decoding). A prompt gets the same answer as through :func:`schedule`: the
    controller's answers never depend on their neighbours. A prompt submitted while others
    decode joins at the next token.

    A prompt may bring its own :class:`~mahalo.engine.rows.Plan` (:meth:`plan`: another
    strategy, N, weights, seed ...) and an ``on_step`` callback, called from the engine thread
    with the response text that is final so far each time it grows (every strategy: what all the
    responses it can still answer with share; see :meth:`Controller.watch`).
    :meth:`prepare` checks a prompt against every model's context from the caller's thread, so a
    server refuses it before it queues. :meth:`cancel` drops a prompt: at once while it waits,
    at the next token in flight; a cancel never stops the engine.

    Faults of one prompt stay with it (its future gets the ``ValueError``). Any other exception in
    the loop (a bug, out of memory) stops the engine: every pending future fails with it,
    :attr:`stopped` holds it, ``on_stop(err)`` is called (a server then exits so that a
    supervisor restarts it), and later :meth:`submit` calls raise :class:`EngineStopped`.
    """

    def __init__(self, controller: Controller, max_prompts: int = 0, max_rows: int = 0,
                 on_stop: Callable[[BaseException], None] | None = None) -> None:
        self.controller = controller
        self.max_prompts, self.max_rows = limits(controller, max_prompts, max_rows)
        self.on_stop = on_stop
        self._cond = threading.Condition()
        self._waiting: deque[tuple[int, object, Plan | None]] = deque()  # guarded by _cond
        self._futures: dict[int, Future] = {}  # ticket -> future, guarded by _cond
        self._tickets_of: dict[int, int] = {}  # id(future) -> ticket, guarded by _cond
        self._on_step: dict[int, Callable[[str], None]] = {}  # ticket -> callback, guarded by _cond
        self._cancel: set[int] = set()  # tickets to drop in flight, guarded by _cond
        self._tickets = 0
        self._stopped: BaseException | None = None
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="mahalo-engine", daemon=True)
        self._thread.start()

    def plan(self, cfg: GuideConfig, objectives: list[str] | None = None) -> Plan:
        """The plan of a prompt decoded with ``cfg`` (see :meth:`Controller.plan`)."""
        return self.controller.plan(cfg, objectives)

    def prepare(self, prompt: object, plan: Plan | None = None) -> Prompt:
        """``prompt`` (a string or message list) tokenised and checked against every model's
        context, ready to :meth:`submit`.

        Raises:
            ValueError: a malformed conversation; :class:`~mahalo.result.PromptError` for a prompt
                too long for a model it will read.
        """
        return self.controller.prepare(as_messages(prompt), plan)

    @property
    def tokenizer(self) -> object:
        """The policy's tokenizer."""
        return self.controller.policy.tokenizer

    def submit(self, prompt: object, plan: Plan | None = None, on_step: Callable[[str], None] | None = None,
               limit: int | None = None) -> Future:
        """Queue ``prompt`` (a string, a message list, or a :class:`Prompt` from :meth:`prepare`),
        decoded by ``plan`` (default: the controller's); the future resolves when it ends.

        Raises:
            Busy: ``limit`` prompts are already pending (nothing was queued).
            EngineStopped: the engine has stopped.
        """
        future: Future = Future()
        with self._cond:
            if self._stopped is not None or self._closing:
                raise EngineStopped(f"the engine has stopped ({self._stopped or 'closed'})")
            if limit is not None and len(self._futures) >= limit:
                raise Busy(f"{len(self._futures)} prompts are pending (limit {limit})")
            ticket = self._tickets
            self._waiting.append((ticket, prompt, plan))
            self._futures[ticket] = future
            self._tickets_of[id(future)] = ticket
            if on_step is not None:
                self._on_step[ticket] = on_step
            self._tickets += 1
            self._cond.notify()
        return future

    def cancel(self, future: Future) -> None:
        """Drop the prompt of ``future`` (a client that went away): a waiting prompt leaves the
        queue, one in flight leaves the batch at the next token. The future is cancelled."""
        with self._cond:
            ticket = self._tickets_of.pop(id(future), None)
            if ticket is None or ticket not in self._futures:
                return
            waiting = [w for w in self._waiting if w[0] == ticket]
            if waiting:
                self._waiting.remove(waiting[0])
            else:
                self._cancel.add(ticket)
            self._futures.pop(ticket)
            self._on_step.pop(ticket, None)
            self._cond.notify()
        future.cancel()

    @property
    def pending(self) -> int:
        """Prompts submitted and not yet answered (waiting or in flight)."""
        with self._cond:
            return len(self._futures)

    @property
    def stopped(self) -> BaseException | None:
        """Why the engine stopped on its own (None while it runs, and after :meth:`close`)."""
        return self._stopped

    def close(self) -> None:
        """Finish the prompts already submitted, then stop the thread."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join()

    # -- the loop (engine thread only) ------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                batch, failed = self._take()
                if batch is None:
                    return
                if batch:
                    refused = self.controller.admit(batch)
                    self._watch([item[0] for item in batch], {ticket for ticket, _ in refused})
                    failed += refused
                for ticket, out in failed:
                    self._deliver(ticket, out)
                with self._cond:
                    cancel, self._cancel = self._cancel, set()
                for ticket in cancel:
                    self.controller.cancel(ticket)
                if self.controller.in_flight:
                    for ticket, out in self.controller.tick():
                        self._deliver(ticket, out)
                    for ticket, text in self.controller.accepted:
                        self._step_done(ticket, text)
        except BaseException as err:  # noqa: BLE001 - handed to every waiting caller, then stop
            log.error("the engine stopped: %s: %s", type(err).__name__, err, exc_info=err)
            with self._cond:
                self._stopped = err
                futures, self._futures = list(self._futures.values()), {}
                self._waiting.clear()
            for future in futures:
                if not future.cancelled():
                    future.set_exception(err)
            if self.on_stop is not None:
                self.on_stop(err)

    def _take(self) -> tuple[list[tuple] | None, list[tuple[int, ValueError]]]:
        """The waiting prompts that fit now (blocks while there is nothing to do: nothing waits,
        nothing is in flight, no cancel to apply); None: closed and drained, stop."""
        controller = self.controller
        in_flight = controller.in_flight
        with self._cond:
            while not self._waiting and not in_flight and not self._closing and not self._cancel:
                self._cond.wait()
            if not self._waiting and not in_flight and self._closing:
                return None, []
            batch, failed, plans = [], [], []
            while self._waiting:
                ticket, prompt, plan = self._waiting[0]
                plan = prompt.plan if isinstance(prompt, Prompt) else plan or controller.default
                if not fits(controller, [*plans, plan], self.max_prompts, self.max_rows):
                    break
                self._waiting.popleft()
                if isinstance(prompt, Prompt):
                    batch.append((ticket, prompt))
                else:
                    try:
                        batch.append((ticket, as_messages(prompt), plan))
                    except ValueError as err:
                        failed.append((ticket, err))
                        continue
                plans.append(plan)
        return batch, failed

    def _watch(self, tickets: list[int], refused: set[int]) -> None:
        """The controller reports the final text of the prompts that joined with an ``on_step``."""
        with self._cond:
            watched = [t for t in tickets if t in self._on_step and t not in refused]
        for ticket in watched:
            self.controller.watch(ticket)

    def _deliver(self, ticket: int, out: GuidedResult | ValueError) -> None:
        with self._cond:
            future = self._futures.pop(ticket, None)
            self._on_step.pop(ticket, None)
            if future is not None:
                self._tickets_of.pop(id(future), None)
        if future is not None and not future.cancelled():
            future.set_result(out)

    def _step_done(self, ticket: int, text: str) -> None:
        with self._cond:
            callback = self._on_step.get(ticket)
        if callback is not None:
            try:
                callback(text)
            except Exception:  # noqa: BLE001 - a caller's callback must not stop the engine for everyone
                log.exception("on_step callback of prompt %d failed", ticket)
