"""Per-host queues that keep a crawler polite: one request at a time, a pause between.

A host is *busy* from the moment one of its URLs is handed out until the caller says
the request is over (``release``); it is *ready* again ``delay`` seconds after that.
So the pause runs from the end of one response to the start of the next request,
however long the response took, and never two requests to one host overlap. URLs
decided without a request (robots-disallowed) are released with ``requested=False``
and cost no pause.

Hosts wait in a heap by the time they become ready, so picking the next URL costs
O(log hosts) whatever the number of hosts. Pure and synchronous, with the clock
passed in: the async worker drives it, and tests drive it with a fake clock.

A scheduler that cannot know when a host was last requested (a crawl unit: the one
before it, or a failed try of itself, may have just requested it) is made with
``since``, the time it took over: each host's first request then waits its delay from
``since``, as if a request had just ended.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass
class _Host(Generic[T]):
    queue: deque = field(default_factory=deque)
    delay: float = 0.0
    ready_at: float = 0.0
    busy: bool = False
    in_heap: bool = False


class HostScheduler(Generic[T]):
    def __init__(self, delay: float, clock: Callable[[], float], since: float | None = None):
        self.default_delay = delay
        self._clock = clock
        self._since = since
        self._hosts: dict[str, _Host[T]] = {}
        self._heap: list[tuple[float, int, str]] = []
        self._order = itertools.count()
        self._queued = 0

    def _host(self, host: str) -> _Host[T]:
        state = self._hosts.get(host)
        if state is None:
            state = self._hosts[host] = _Host(delay=self.default_delay)
            self._rest(state)
        return state

    def _rest(self, state: _Host[T]) -> None:
        if self._since is not None:
            state.ready_at = max(state.ready_at, self._since + state.delay)

    def _schedule(self, host: str, state: _Host[T]) -> None:
        if state.queue and not state.busy and not state.in_heap:
            heapq.heappush(self._heap, (state.ready_at, next(self._order), host))
            state.in_heap = True

    def push(self, host: str, item: T, *, front: bool = False) -> None:
        state = self._host(host)
        (state.queue.appendleft if front else state.queue.append)(item)
        self._queued += 1
        self._schedule(host, state)

    def set_delay(self, host: str, delay: float) -> None:
        """From the host's next pause on (before its first request, with ``since``: from its first)."""
        state = self._host(host)
        state.delay = delay
        if not state.in_heap:  # a host waiting in the heap keeps its turn
            self._rest(state)

    def pop_ready(self) -> tuple[str, T] | None:
        """A URL of a host that may be contacted now (the host is then busy), or None."""
        now = self._clock()
        while self._heap and self._heap[0][0] <= now:
            _, _, host = heapq.heappop(self._heap)
            state = self._hosts[host]
            state.in_heap = False
            if state.queue and not state.busy:
                state.busy = True
                self._queued -= 1
                return host, state.queue.popleft()
        return None

    def release(self, host: str, *, requested: bool = True) -> None:
        """The host's request is over (or there was none): ready again after its delay."""
        state = self._hosts[host]
        state.busy = False
        if requested:
            state.ready_at = self._clock() + state.delay
        self._schedule(host, state)

    def drop_queue(self, host: str) -> list[T]:
        """Everything still queued for ``host`` (e.g. once it is known to be blocked)."""
        state = self._host(host)
        items = list(state.queue)
        state.queue.clear()
        self._queued -= len(items)
        return items

    def seconds_until_ready(self) -> float | None:
        """How long until some queued host is ready; None when nothing is waiting on a free host."""
        if not self._heap:
            return None
        return max(0.0, self._heap[0][0] - self._clock())

    @property
    def queued(self) -> int:
        return self._queued
