"""Discovery fed by EDS: a :class:`~meshlib.discovery.base.Resolver` whose answers are pushed by the ADS stream.

The refresh loop (:mod:`meshlib.discovery.refresh`) drives every discovery source the same way; an xDS cluster's
endpoints arrive on the ADS stream instead of being asked for, so :meth:`EdsResolver.resolve` *waits for the next
push* and returns ``Resolution(endpoints, ttl=None, watch=True)`` (the form Consul's blocking queries use): the loop
calls it again at once and keeps the last good set while it raises. So a push takes effect as soon as the stream
thread hands it over, without polling.

- The first call returns as soon as the first ``ClusterLoadAssignment`` is accepted. A resource the server says
  does not exist (or that never came within the client's does-not-exist timer) is a
  :class:`~meshlib.DiscoveryError`; a NACKed update keeps the last accepted endpoints (the client never reports a
  NACKed value).
- Later calls block until the next change, at most ``wait`` seconds (then return the same answer: no change).
- :meth:`aresolve` waits on the event loop (asyncio or trio) without a thread: the stream thread wakes the loop
  with ``call_soon_threadsafe`` / ``TrioToken.run_sync_soon``.
- :meth:`close` cancels the watch and ends any wait at once.
- The assignment's ``drop_overloads`` go to :attr:`EdsResolver.drops` (a :class:`Drops`) as it is pushed (its
  endpoints at the refresh loop's next answer); the cluster's service reads them on the request path
  (``Plan.admit``).

:class:`PushedResolver` is the waiting part, shared with the aggregate cluster's resolver
(:mod:`meshlib.control.xds.aggregate`), which waits on its leaves' pushes.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable

from meshlib.control.dynamic import DEFAULT_WAIT, PushedResolver
from meshlib.control.xds.client import CLUSTER_LOAD_ASSIGNMENT, AdsClient, ResourceState
from meshlib.control.xds.resources.eds import DropCategory
from meshlib.discovery.base import Resolution
from meshlib.errors import DiscoveryError

__all__ = ["DEFAULT_WAIT", "Drops", "EdsResolver", "PushedResolver"]

#: A drop category's rate is parts per million (gRPC's ``xds_cluster_impl``).
MILLION = 1_000_000


class Drops:
    """A cluster's EDS ``drop_overloads`` as the request path reads them (gRPC's ``xds_cluster_impl`` picker).

    ``categories`` is replaced whole (one attribute assignment) when the resolver hands a new assignment to the
    refresh loop; the request path reads it without a lock. :meth:`draw` is called once per call, only when
    ``categories`` is not empty: each category in order draws a number below a million and drops the call when
    it is below the category's rate (A27's drop, as C-core and grpc-go draw it). Drops are counted per category.
    """

    __slots__ = ("_counts", "_lock", "categories")

    def __init__(self) -> None:
        self.categories: tuple[DropCategory, ...] = ()
        self._counts: dict[str, int] = {}
        self._lock = threading.Lock()

    def draw(self) -> str | None:
        """The category that drops this call, or ``None`` (the call goes on)."""
        for category in self.categories:
            if random.randrange(MILLION) < category.per_million:
                with self._lock:
                    self._counts[category.category] = self._counts.get(category.category, 0) + 1
                return category.category
        return None

    def counts(self) -> dict[str, int]:
        """Calls dropped so far, by category."""
        with self._lock:
            return dict(self._counts)


class EdsResolver(PushedResolver):
    """Endpoints of the EDS resource ``eds_name`` (a cluster's ``service_name``, else its name) from ``client``,
    for meshlib service ``service``; ``drops`` holds the assignment's ``drop_overloads`` for the request path
    (the :class:`~meshlib._service.Service` reads it). ``on_push`` is called after each push (an aggregate
    cluster listens to its leaves so)."""

    def __init__(
        self,
        client: AdsClient,
        service: str,
        eds_name: str,
        *,
        wait: float = DEFAULT_WAIT,
        on_push: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(service, f"xds EDS {eds_name} ({client.server})", wait=wait)
        self._state: ResourceState | None = None
        self._on_push = on_push
        self.drops = Drops()
        self._cancel = client.watch(CLUSTER_LOAD_ASSIGNMENT, eds_name, self._on_state)

    def _on_state(self, state: ResourceState) -> None:
        """Fed by the ADS stream thread."""

        def keep() -> None:
            self._state = state
            if state.value is not None:  # drops apply from the push on (endpoints from the next refresh)
                self.drops.categories = tuple(getattr(state.value, "drops", ()))

        self._pushed(keep)
        if self._on_push is not None:
            self._on_push()

    @property
    def answered(self) -> bool:
        """Whether the control plane has answered for the resource (endpoints, or known not to exist)."""
        with self._changed:
            return self._state is not None

    def current(self) -> Resolution:
        """The endpoints as they are now, without waiting for a push (an aggregate cluster reads its leaves so)."""
        with self._changed:
            seen = self._seen
            try:
                return self._answer_locked()
            finally:
                self._seen = seen  # a peek: the refresh loop still hears about the push it has not seen

    def _release(self) -> None:
        self._cancel()

    def _answer_locked(self) -> Resolution:
        state = self._state
        if self._closed:
            # Interrupted by close(): the last answer, so the refresh loop sees no change and ends quietly.
            if state is not None and state.value is not None:
                return Resolution(tuple(getattr(state.value, "endpoints", ())), ttl=None, watch=True)
            raise DiscoveryError("the xDS resolver is closed", service=self.service, source=self.source)
        self._seen = self._generation
        if state is None:
            raise DiscoveryError("no EDS answer from the control plane yet", service=self.service, source=self.source)
        if state.status == "DOES_NOT_EXIST" or state.value is None:
            reason = state.error or "the control plane has no such ClusterLoadAssignment"
            raise DiscoveryError(reason, service=self.service, source=self.source)
        endpoints = getattr(state.value, "endpoints", ())
        return Resolution(tuple(endpoints), ttl=None, watch=True)
