"""Per-call resilience rules (:class:`Policy`) and the scopes that set them (:func:`policy`).

A :class:`Policy` is an immutable value: deadline, retry and backoff rules for one logical call. Every field
may be ``None``, meaning "not set at this layer", so policies stack. The transport resolves, for each request
(see docs/design.md, step 2)::

    DEFAULT_POLICY  <  MESHLIB_* env  <  MESHLIB_SERVICE_<NAME>__*  <  route rule  <  policy() scopes
                    <  request extension

where a later layer's set fields win (:meth:`Policy.merge`). The route layer is the matched rule's
``timeouts`` and ``retry`` (docs/routing.md), merged over the *called* service's policy when the table is
installed, so it costs nothing per request. The scope layer lives in a :mod:`contextvars`
variable, so a scope entered around ``await`` is inherited by the asyncio tasks it creates, is isolated from
concurrent tasks, and is invisible to other threads (a new thread starts with an empty context;
``asyncio.to_thread`` and ``loop.run_in_executor`` via ``contextvars.copy_context`` carry it along)::

    @meshlib.policy(timeout=1.5, retries=2)          # every mesh call made inside charge() obeys it
    def charge(order): ...

    with meshlib.policy(deadline=0.8):                # or async with; nests
        client.get("http://users/me")

    client.get("http://users/me", extensions={POLICY_EXTENSION: Policy(retries=0)})   # one request

``timeout`` vs ``deadline``: ``timeout`` is the budget of *each* logical call (all attempts and backoff
included), restarted for every call made in the scope. ``deadline`` is fixed when the scope is entered: an
absolute point in time shared by every call made inside, as gRPC and Finagle deadlines are. Deadlines only
ever shrink: a nested scope (or an inbound request's budget, see :mod:`meshlib.server`) sets
``min(outer deadline, now + deadline)``, so code deeper in the stack can never grant itself more time than
its caller has left.
"""

from __future__ import annotations

import functools
import inspect
import math
import time
from collections.abc import Awaitable, Callable, Iterable
from collections.abc import Set as AbstractSet
from contextvars import ContextVar
from dataclasses import dataclass, replace
from types import TracebackType
from typing import Any, ParamSpec, TypeVar, cast

from meshlib.errors import ConfigError
from meshlib.resilience.hedging import DEFAULT_HEDGE_POLICY, HedgePolicy

__all__ = [
    "DEFAULT_POLICY",
    "MAX_ATTEMPTS",
    "MAX_RETRIES",
    "NO_POLICY",
    "POLICY_EXTENSION",
    "Policy",
    "PolicyScope",
    "current_deadline",
    "current_policy",
    "effective",
    "policy",
]

#: ``request.extensions`` key of a per-request :class:`Policy`, the innermost layer:
#: ``client.get(url, extensions={"meshlib.policy": Policy(retries=0)})``.
POLICY_EXTENSION = "meshlib.policy"

#: Hard cap on attempts of one call (first try included), whatever ``retries`` says: gRPC clamps
#: ``maxAttempts`` above 5 to 5 (gRFC A6), so a misconfigured policy cannot multiply load without bound.
MAX_ATTEMPTS = 5
#: The largest ``retries`` a policy accepts; values above ``MAX_ATTEMPTS - 1`` are valid but clamped.
MAX_RETRIES = 10

#: Statuses retried by default: gateway failures (Envoy's ``retry_on: 5xx``-style gateway-error, Istio's
#: defaults, gRPC's UNAVAILABLE). 429 is handled separately and always with ``Retry-After``.
DEFAULT_RETRY_ON: frozenset[int] = frozenset({502, 503, 504})

P = ParamSpec("P")
R = TypeVar("R")


def _check_seconds(name: str, value: object, *, allow_zero: bool, allow_inf: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ConfigError(f"Policy.{name}", value, "a number of seconds")
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"Policy.{name}", value, "a number of seconds " + (">= 0" if allow_zero else "> 0"))
    if math.isinf(value) and not allow_inf:
        raise ConfigError(f"Policy.{name}", value, "a finite number of seconds")
    return float(value)


@dataclass(frozen=True, slots=True)
class Policy:
    """The rules of one logical call. Immutable; ``None`` means "not set here, inherit".

    * ``timeout`` -- seconds for the whole logical call: every attempt and every backoff sleep (Envoy's
      route timeout, which "includes all retries"). Default 15 s, Envoy's route default. ``math.inf``: none.
    * ``deadline`` -- seconds from *scope entry*: one absolute deadline shared by every call made in the
      scope (gRPC/Finagle deadlines). In a per-request or client policy it acts like ``timeout``.
      Default ``math.inf`` (no deadline besides ``timeout``). ``0`` is allowed: already expired.
    * ``per_try_timeout`` -- cap on one attempt (Envoy's ``per_try_timeout``), so a hung endpoint leaves time
      to retry another. Default ``math.inf``: an attempt may use the whole remaining budget.
    * ``retries`` -- retries after the first attempt, 0..10; attempts are clamped to :data:`MAX_ATTEMPTS`
      (5, as gRPC). Default 1: Envoy's ``num_retries``, Linkerd's and Istio's default (2 attempts).
    * ``retry_on`` -- response statuses that are retried (idempotency rules permitting). Default
      {502, 503, 504}. 429 is always retried (on another endpoint), after its ``Retry-After`` when usable,
      else after the usual backoff.
    * ``retry_non_idempotent`` -- allow retrying POST/PATCH after the request may have reached a server
      (an ``Idempotency-Key`` header does the same per request). Default False: istio/istio#13851 is what
      happens otherwise. Requests provably never sent are retried whatever this says.
    * ``backoff_base`` / ``backoff_cap`` -- exponential backoff with full jitter,
      ``uniform(0, min(cap, base * 2**n))``. Defaults 25 ms / 250 ms: Envoy's router and Linkerd.
    * ``retry_after_cap`` -- a ``Retry-After`` longer than this is ignored and the retry waits the usual
      backoff instead. Default 300 s: Envoy's ``rate_limited_retry_back_off`` max, Linkerd's too.
    * ``hedge`` -- a :class:`~meshlib.resilience.hedging.HedgePolicy`: send further copies of a slow call to
      other endpoints and keep the first answer (gRFC A6 hedging under Finagle's extra-load budget). Layers
      merge field by field. Default: no hedging (``max_attempts=1``). A call that hedges is not retried on top
      (A6): its ``max_attempts`` counts every copy.

    Invalid values raise :class:`meshlib.ConfigError` (a ``ValueError``) naming the field.
    """

    timeout: float | None = None
    deadline: float | None = None
    per_try_timeout: float | None = None
    retries: int | None = None
    retry_on: AbstractSet[int] | None = None
    retry_non_idempotent: bool | None = None
    backoff_base: float | None = None
    backoff_cap: float | None = None
    retry_after_cap: float | None = None
    hedge: HedgePolicy | None = None

    def __post_init__(self) -> None:
        put = object.__setattr__
        if self.timeout is not None:
            put(self, "timeout", _check_seconds("timeout", self.timeout, allow_zero=False, allow_inf=True))
        if self.deadline is not None:
            put(self, "deadline", _check_seconds("deadline", self.deadline, allow_zero=True, allow_inf=True))
        if self.per_try_timeout is not None:
            value = _check_seconds("per_try_timeout", self.per_try_timeout, allow_zero=False, allow_inf=True)
            put(self, "per_try_timeout", value)
        if self.retries is not None:
            retries = self.retries
            if isinstance(retries, bool) or not isinstance(retries, int) or not 0 <= retries <= MAX_RETRIES:
                raise ConfigError(
                    "Policy.retries", retries, f"an integer from 0 to {MAX_RETRIES} (attempts are capped at 5)"
                )
        if self.retry_on is not None:
            put(self, "retry_on", _statuses(self.retry_on))
        if self.retry_non_idempotent is not None and not isinstance(self.retry_non_idempotent, bool):
            raise ConfigError("Policy.retry_non_idempotent", self.retry_non_idempotent, "True or False")
        if self.backoff_base is not None:
            value = _check_seconds("backoff_base", self.backoff_base, allow_zero=True, allow_inf=False)
            put(self, "backoff_base", value)
        if self.backoff_cap is not None:
            put(self, "backoff_cap", _check_seconds("backoff_cap", self.backoff_cap, allow_zero=True, allow_inf=False))
        if self.retry_after_cap is not None:
            value = _check_seconds("retry_after_cap", self.retry_after_cap, allow_zero=True, allow_inf=False)
            put(self, "retry_after_cap", value)
        if self.hedge is not None and not isinstance(self.hedge, HedgePolicy):
            raise ConfigError("Policy.hedge", self.hedge, "a meshlib.HedgePolicy")
        if self.backoff_base is not None and self.backoff_cap is not None and self.backoff_base > self.backoff_cap:
            expected = f"a duration >= backoff_base ({self.backoff_base})"
            raise ConfigError("Policy.backoff_cap", self.backoff_cap, expected)

    def merge(self, inner: Policy) -> Policy:
        """This policy overridden by ``inner``'s set fields (``inner`` is the more specific layer)."""
        if inner is NO_POLICY:
            return self
        if self is NO_POLICY:
            return inner
        merged = object.__new__(Policy)  # both sides are valid already: skip re-validation
        put = object.__setattr__
        put(merged, "timeout", self.timeout if inner.timeout is None else inner.timeout)
        put(merged, "deadline", self.deadline if inner.deadline is None else inner.deadline)
        put(merged, "per_try_timeout", self.per_try_timeout if inner.per_try_timeout is None else inner.per_try_timeout)
        put(merged, "retries", self.retries if inner.retries is None else inner.retries)
        put(merged, "retry_on", self.retry_on if inner.retry_on is None else inner.retry_on)
        put(
            merged,
            "retry_non_idempotent",
            self.retry_non_idempotent if inner.retry_non_idempotent is None else inner.retry_non_idempotent,
        )
        put(merged, "backoff_base", self.backoff_base if inner.backoff_base is None else inner.backoff_base)
        put(merged, "backoff_cap", self.backoff_cap if inner.backoff_cap is None else inner.backoff_cap)
        put(merged, "retry_after_cap", self.retry_after_cap if inner.retry_after_cap is None else inner.retry_after_cap)
        hedge, inner_hedge = self.hedge, inner.hedge
        if inner_hedge is not None:
            hedge = inner_hedge if hedge is None else hedge.merge(inner_hedge)
        put(merged, "hedge", hedge)
        return merged

    def resolved(self) -> Policy:
        """This policy with every unset field taken from :data:`DEFAULT_POLICY` (so no field is ``None``)."""
        return DEFAULT_POLICY.merge(self)

    @property
    def complete(self) -> bool:
        """Whether every field is set (as in :data:`DEFAULT_POLICY` and anything :meth:`resolved` returns)."""
        return (
            self.timeout is not None
            and self.deadline is not None
            and self.per_try_timeout is not None
            and self.retries is not None
            and self.retry_on is not None
            and self.retry_non_idempotent is not None
            and self.backoff_base is not None
            and self.backoff_cap is not None
            and self.retry_after_cap is not None
            and self.hedge is not None
        )

    @property
    def max_attempts(self) -> int:
        """Attempts of one call, first included: ``retries + 1`` clamped to :data:`MAX_ATTEMPTS`."""
        retries = DEFAULT_RETRIES if self.retries is None else self.retries
        return min(retries + 1, MAX_ATTEMPTS)


def _statuses(value: object) -> frozenset[int]:
    expected = "a set of HTTP status codes from 100 to 599"
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise ConfigError("Policy.retry_on", value, expected)
    try:
        statuses = frozenset(value)
    except TypeError:
        raise ConfigError("Policy.retry_on", value, expected) from None
    for status in statuses:
        if isinstance(status, bool) or not isinstance(status, int) or not 100 <= status <= 599:
            raise ConfigError("Policy.retry_on", value, expected)
    return statuses


DEFAULT_TIMEOUT = 15.0
DEFAULT_RETRIES = 1

#: Nothing set: the identity of :meth:`Policy.merge`.
NO_POLICY = Policy()

#: The bottom layer, every field set; see :class:`Policy` for where each number comes from.
DEFAULT_POLICY = Policy(
    timeout=DEFAULT_TIMEOUT,
    deadline=math.inf,
    per_try_timeout=math.inf,
    retries=DEFAULT_RETRIES,
    retry_on=DEFAULT_RETRY_ON,
    retry_non_idempotent=False,
    backoff_base=0.025,
    backoff_cap=0.25,
    retry_after_cap=300.0,
    hedge=DEFAULT_HEDGE_POLICY,
)


# --- scopes ---------------------------------------------------------------------------------------------


class _Frame:
    """One entered scope: the scope layer merged with its parents', and the absolute deadline.

    Frames form an immutable linked stack held in one context variable, so entering and leaving a scope is
    one ``ContextVar.set`` and each context (task, thread) sees only its own stack. ``merged`` caches
    ``base.merge(policy)`` per base policy (keyed by identity; the entry holds the base alive so its id
    cannot be reused), so the request path merges once per (scope, service) rather than per request.
    """

    __slots__ = ("deadline", "merged", "owner", "parent", "policy")

    def __init__(self, owner: object, policy: Policy, deadline: float | None, parent: _Frame | None) -> None:
        self.owner = owner
        self.policy = policy
        self.deadline = deadline
        self.parent = parent
        self.merged: dict[int, tuple[Policy, Policy]] = {}


_scope: ContextVar[_Frame | None] = ContextVar("meshlib.policy.scope", default=None)


def current_policy() -> Policy:
    """The rules set by the enclosing :func:`policy` scopes, merged (unset fields ``None``).

    :data:`NO_POLICY` outside any scope. The ``deadline`` field is always ``None`` here: a scope's deadline
    is absolute and is read with :func:`current_deadline`.
    """
    frame = _scope.get()
    return NO_POLICY if frame is None else frame.policy


def reset_scope() -> None:
    """Leave every :func:`policy` scope in the current context (a background task that outlives its caller)."""
    _scope.set(None)


def current_deadline() -> float | None:
    """The absolute deadline of the enclosing scopes, in :func:`time.monotonic` seconds, or ``None``.

    ``current_deadline() - time.monotonic()`` is the time left (negative once expired).
    """
    frame = _scope.get()
    return None if frame is None else frame.deadline


class PolicyScope:
    """A :class:`Policy` applied to a block of code: ``with``, ``async with``, or a decorator.

    Returned by :func:`policy`. The same object may be entered any number of times, nested, and from
    concurrent tasks or threads: the entered state lives in the context, not in the object. Entering
    returns the merged scope policy now in effect (as :func:`current_policy` would).
    """

    __slots__ = ("_deadline", "_layer", "policy")

    def __init__(self, rules: Policy) -> None:
        self.policy = rules
        self._deadline = rules.deadline
        self._layer = rules if rules.deadline is None else replace(rules, deadline=None)

    def __repr__(self) -> str:
        return f"PolicyScope({self.policy!r})"

    def __enter__(self) -> Policy:
        parent = _scope.get()
        deadline = None if parent is None else parent.deadline
        if self._deadline is not None and self._deadline != math.inf:
            mine = time.monotonic() + self._deadline
            if deadline is None or mine < deadline:
                deadline = mine
        merged = self._layer if parent is None else parent.policy.merge(self._layer)
        _scope.set(_Frame(self, merged, deadline, parent))
        return merged

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        frame = _scope.get()
        if frame is None or frame.owner is not self:
            raise RuntimeError(
                "meshlib policy scope left out of order, or in another context than the one it was entered in"
            )
        _scope.set(frame.parent)

    async def __aenter__(self) -> Policy:
        return self.__enter__()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.__exit__(exc_type, exc, tb)

    def __call__(self, fn: Callable[P, R]) -> Callable[P, R]:
        """Decorate a function or coroutine function: each call runs inside this scope.

        A deadline is fixed at each call (not at decoration). Generator functions are refused: a scope
        cannot follow a generator across its ``yield`` points; use ``with policy(...)`` inside it instead.
        """
        if inspect.isgeneratorfunction(fn) or inspect.isasyncgenfunction(fn):
            raise TypeError(f"@policy cannot decorate generator {fn!r}: use `with policy(...)` in its body")
        if inspect.iscoroutinefunction(fn):
            coro_fn = cast(Callable[P, Awaitable[Any]], fn)

            @functools.wraps(fn)
            async def async_wrapper(*args: P.args, **kwargs: P.kwargs) -> Any:
                with self:
                    return await coro_fn(*args, **kwargs)

            return cast(Callable[P, R], async_wrapper)

        @functools.wraps(fn)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            with self:
                return fn(*args, **kwargs)

        return wrapper


def policy(
    rules: Policy | None = None,
    /,
    *,
    timeout: float | None = None,
    deadline: float | None = None,
    per_try_timeout: float | None = None,
    retries: int | None = None,
    retry_on: AbstractSet[int] | None = None,
    retry_non_idempotent: bool | None = None,
    backoff_base: float | None = None,
    backoff_cap: float | None = None,
    retry_after_cap: float | None = None,
    hedge: HedgePolicy | None = None,
) -> PolicyScope:
    """A scope applying these rules to every mesh call made inside it; decorator or context manager.

    ``policy(Policy(...))`` applies a prebuilt policy; keyword fields given too override it. Values are
    validated here (at decoration time for the decorator form). See :class:`Policy` for the fields.
    """
    fields = Policy(
        timeout=timeout,
        deadline=deadline,
        per_try_timeout=per_try_timeout,
        retries=retries,
        retry_on=retry_on,
        retry_non_idempotent=retry_non_idempotent,
        backoff_base=backoff_base,
        backoff_cap=backoff_cap,
        retry_after_cap=retry_after_cap,
        hedge=hedge,
    )
    if rules is not None and not isinstance(rules, Policy):
        raise TypeError(f"policy() takes a Policy or keyword fields, not {type(rules).__name__}")
    return PolicyScope(fields if rules is None else rules.merge(fields))


# --- the request path -----------------------------------------------------------------------------------

_COMPLETED: dict[int, tuple[Policy, Policy]] = {}
_COMPLETED_MAX = 256


def _complete(base: Policy) -> Policy:
    entry = _COMPLETED.get(id(base))
    if entry is not None and entry[0] is base:
        return entry[1]
    done = base if base.complete else DEFAULT_POLICY.merge(base)
    if len(_COMPLETED) >= _COMPLETED_MAX:
        _COMPLETED.clear()  # bounded: callers passing a fresh base per request must not grow memory
    _COMPLETED[id(base)] = (base, done)
    return done


def effective(base: Policy, request_policy: Policy | None = None) -> tuple[Policy, float]:
    """The policy of one call and its absolute deadline (:func:`time.monotonic` seconds).

    ``base`` is the client's policy for the service (``MeshConfig.policy_for(key)``: defaults, env,
    per-service env), for a routed call merged with the matched rule's; the enclosing scopes and then
    ``request_policy`` (the request's :data:`POLICY_EXTENSION`) override it. The returned policy is
    complete (no ``None`` field; an incomplete ``base`` is completed from :data:`DEFAULT_POLICY`). The
    deadline is
    ``min(now + timeout, now + request/base deadline, scope deadline)``; it is ``math.inf`` only when all
    of them are infinite, and may already be in the past (an expired inbound budget): the caller raises
    ``DeadlineExceeded`` before any attempt in that case.

    Called once per request, so it avoids work: outside any scope it merges nothing; inside one, the
    merge of (base, scope) is cached on the scope.
    """
    now = time.monotonic()
    frame = _scope.get()
    if frame is None:
        rules = _complete(base)
        scope_deadline = None
    else:
        entry = frame.merged.get(id(base))
        if entry is not None and entry[0] is base:
            rules = entry[1]
        else:
            rules = _complete(base).merge(frame.policy)
            if len(frame.merged) >= _COMPLETED_MAX:
                frame.merged.clear()
            frame.merged[id(base)] = (base, rules)
        scope_deadline = frame.deadline
    if request_policy is not None and request_policy is not NO_POLICY:
        rules = rules.merge(request_policy)
    deadline = now + cast(float, rules.timeout)
    own = rules.deadline
    if own is not None and own != math.inf and now + own < deadline:
        deadline = now + own
    if scope_deadline is not None and scope_deadline < deadline:
        deadline = scope_deadline
    return rules, deadline
