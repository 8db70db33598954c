"""Policy values, merge rules, and policy scopes: nesting, deadlines that only shrink, sync/async/threads."""

from __future__ import annotations

import asyncio
import contextvars
import math
import threading
import time

import pytest

import meshlib
from meshlib.policy import (
    DEFAULT_POLICY,
    MAX_ATTEMPTS,
    NO_POLICY,
    POLICY_EXTENSION,
    Policy,
    current_deadline,
    current_policy,
    effective,
    policy,
)

pytestmark = pytest.mark.one_library

# --- the value object -------------------------------------------------------------------------------------


def test_default_policy_is_complete_and_cites_the_usual_defaults() -> None:
    assert DEFAULT_POLICY.complete
    assert DEFAULT_POLICY.timeout == 15.0  # Envoy route default
    assert DEFAULT_POLICY.retries == 1  # Envoy / Linkerd / Istio
    assert DEFAULT_POLICY.retry_on == frozenset({502, 503, 504})
    assert DEFAULT_POLICY.retry_non_idempotent is False
    assert (DEFAULT_POLICY.backoff_base, DEFAULT_POLICY.backoff_cap) == (0.025, 0.25)
    assert DEFAULT_POLICY.retry_after_cap == 300.0
    assert DEFAULT_POLICY.per_try_timeout == math.inf
    assert not NO_POLICY.complete
    assert POLICY_EXTENSION == "meshlib.policy"


def test_policy_is_immutable_and_hashable() -> None:
    rules = Policy(timeout=1, retry_on={503})
    with pytest.raises(AttributeError):
        rules.timeout = 2  # type: ignore[misc]
    assert rules.retry_on == frozenset({503}) and isinstance(rules.retry_on, frozenset)
    assert rules.timeout == 1.0 and isinstance(rules.timeout, float)
    assert hash(rules) == hash(Policy(timeout=1.0, retry_on=frozenset({503})))


def test_merge_inner_set_fields_win() -> None:
    outer = Policy(timeout=5, retries=3, retry_non_idempotent=True)
    inner = Policy(retries=0, backoff_base=0.1)
    merged = outer.merge(inner)
    assert merged == Policy(timeout=5, retries=0, retry_non_idempotent=True, backoff_base=0.1)
    assert outer.merge(NO_POLICY) is outer
    assert NO_POLICY.merge(inner) is inner
    assert Policy(retries=2).resolved() == DEFAULT_POLICY.merge(Policy(retries=2))
    assert Policy(retries=2).resolved().complete


def test_max_attempts_is_clamped_like_grpc() -> None:
    assert Policy(retries=0).max_attempts == 1
    assert Policy(retries=2).max_attempts == 3
    assert Policy(retries=10).max_attempts == MAX_ATTEMPTS == 5
    assert NO_POLICY.max_attempts == 2  # default: one retry


@pytest.mark.parametrize(
    ("fields", "field", "expected"),
    [
        ({"timeout": -1}, "timeout", "> 0"),
        ({"timeout": 0}, "timeout", "> 0"),
        ({"timeout": float("nan")}, "timeout", "seconds"),
        ({"timeout": "1s"}, "timeout", "seconds"),
        ({"deadline": -0.5}, "deadline", ">= 0"),
        ({"per_try_timeout": 0}, "per_try_timeout", "> 0"),
        ({"retries": 11}, "retries", "from 0 to 10"),
        ({"retries": -1}, "retries", "from 0 to 10"),
        ({"retries": 1.5}, "retries", "integer"),
        ({"retries": True}, "retries", "integer"),
        ({"retry_on": {503, 700}}, "retry_on", "100 to 599"),
        ({"retry_on": "503"}, "retry_on", "status codes"),
        ({"retry_non_idempotent": "yes"}, "retry_non_idempotent", "True or False"),
        ({"backoff_base": math.inf}, "backoff_base", "finite"),
        ({"backoff_base": 1.0, "backoff_cap": 0.5}, "backoff_cap", "backoff_base"),
        ({"retry_after_cap": -3}, "retry_after_cap", ">= 0"),
    ],
)
def test_invalid_fields_are_refused_with_clear_messages(fields: dict[str, object], field: str, expected: str) -> None:
    with pytest.raises(meshlib.ConfigError) as info:
        Policy(**fields)  # type: ignore[arg-type]
    assert info.value.variable == f"Policy.{field}"
    assert expected in str(info.value)
    assert isinstance(info.value, ValueError)


def test_policy_factory_validates_at_decoration_time() -> None:
    with pytest.raises(ValueError, match=r"Policy\.timeout"):
        policy(timeout=-1)
    with pytest.raises(TypeError):
        policy({"timeout": 1})  # type: ignore[arg-type]


def test_policy_factory_takes_a_policy_and_keyword_overrides() -> None:
    base = Policy(timeout=2, retries=3)
    assert policy(base).policy == base
    assert policy(base, retries=0).policy == Policy(timeout=2, retries=0)


# --- scopes -----------------------------------------------------------------------------------------------


def test_no_scope_means_no_policy_and_no_deadline() -> None:
    assert current_policy() is NO_POLICY
    assert current_deadline() is None


def test_scopes_nest_inner_fields_override_and_restore_on_exit() -> None:
    with policy(timeout=5, retries=3) as outer:
        assert outer == Policy(timeout=5, retries=3)
        with policy(retries=0, backoff_base=0.1):
            assert current_policy() == Policy(timeout=5, retries=0, backoff_base=0.1)
        assert current_policy() == Policy(timeout=5, retries=3)
    assert current_policy() is NO_POLICY


def test_scope_deadline_is_absolute_and_kept_out_of_the_policy() -> None:
    before = time.monotonic()
    with policy(deadline=10):
        deadline = current_deadline()
        assert deadline is not None
        assert before + 10 <= deadline <= time.monotonic() + 10
        assert current_policy().deadline is None
    assert current_deadline() is None


def test_inner_scope_cannot_extend_the_outer_deadline() -> None:
    with policy(deadline=1):
        outer = current_deadline()
        assert outer is not None
        with policy(deadline=60):
            assert current_deadline() == outer
        with policy(timeout=60):  # a per-call timeout does not touch the scope deadline either
            assert current_deadline() == outer
        with policy(deadline=0.5):
            inner = current_deadline()
            assert inner is not None and inner < outer
        assert current_deadline() == outer


def test_infinite_deadline_sets_none() -> None:
    with policy(deadline=math.inf):
        assert current_deadline() is None


def test_scope_restores_after_an_exception() -> None:
    with pytest.raises(KeyError), policy(retries=4, deadline=1):
        raise KeyError("boom")
    assert current_policy() is NO_POLICY and current_deadline() is None


def test_leaving_scopes_out_of_order_is_an_error() -> None:
    first, second = policy(retries=1), policy(retries=2)
    first.__enter__()
    second.__enter__()
    with pytest.raises(RuntimeError, match="out of order"):
        first.__exit__(None, None, None)
    second.__exit__(None, None, None)
    first.__exit__(None, None, None)
    assert current_policy() is NO_POLICY


def test_the_same_scope_object_can_be_reentered() -> None:
    scope = policy(retries=2, deadline=30)
    with scope, scope:
        assert current_policy().retries == 2
    with scope:
        assert current_policy().retries == 2
    assert current_policy() is NO_POLICY


def test_decorator_on_a_sync_function() -> None:
    @policy(timeout=1.5, retries=2)
    def charge(order: int) -> tuple[int, Policy]:
        """Charge an order."""
        return order, current_policy()

    assert charge(7) == (7, Policy(timeout=1.5, retries=2))
    assert charge.__name__ == "charge" and charge.__doc__ == "Charge an order."
    assert current_policy() is NO_POLICY


def test_decorator_deadline_is_fixed_per_call() -> None:
    @policy(deadline=5)
    def remaining() -> float:
        deadline = current_deadline()
        assert deadline is not None
        return deadline

    first = remaining()
    second = remaining()
    assert second >= first  # a fresh deadline at each call, not one fixed at decoration


def test_decorator_refuses_generators() -> None:
    def gen() -> object:
        yield 1

    with pytest.raises(TypeError, match="generator"):
        policy(retries=1)(gen)


@pytest.mark.anyio
async def test_decorator_on_a_coroutine_function() -> None:
    @policy(retries=0, deadline=30)
    async def call() -> tuple[Policy, float | None]:
        await asyncio.sleep(0)
        return current_policy(), current_deadline()

    rules, deadline = await call()
    assert rules == Policy(retries=0)
    assert deadline is not None
    assert current_policy() is NO_POLICY and current_deadline() is None


@pytest.mark.anyio
async def test_async_with_and_task_inheritance() -> None:
    async with policy(timeout=3, deadline=20):
        outer = current_deadline()

        async def child() -> tuple[Policy, float | None]:
            await asyncio.sleep(0)
            return current_policy(), current_deadline()

        rules, deadline = await asyncio.create_task(child())
        assert rules == Policy(timeout=3)
        assert deadline == outer
    assert current_policy() is NO_POLICY


@pytest.mark.anyio
async def test_concurrent_tasks_are_isolated() -> None:
    """Tasks entering different scopes (even the same scope object) interleave without seeing each other."""
    shared = policy(retries=4)
    steps: list[int] = []

    async def worker(n: int, gate: asyncio.Event, other: asyncio.Event) -> list[Policy]:
        seen = []
        with policy(retries=n):
            gate.set()
            await other.wait()  # both tasks are now inside their scopes at once
            seen.append(current_policy())
            with shared:
                await asyncio.sleep(0)
                seen.append(current_policy())
                steps.append(n)
            seen.append(current_policy())
        seen.append(current_policy())
        return seen

    a_in, b_in = asyncio.Event(), asyncio.Event()
    a, b = await asyncio.gather(worker(1, a_in, b_in), worker(2, b_in, a_in))
    assert a == [Policy(retries=1), Policy(retries=4), Policy(retries=1), NO_POLICY]
    assert b == [Policy(retries=2), Policy(retries=4), Policy(retries=2), NO_POLICY]
    assert sorted(steps) == [1, 2]


@pytest.mark.anyio
async def test_to_thread_carries_the_scope() -> None:
    with policy(retries=3):
        rules = await asyncio.to_thread(current_policy)
    assert rules == Policy(retries=3)


def test_threads_do_not_see_each_others_scopes() -> None:
    inside = threading.Barrier(2, timeout=10)
    seen: dict[str, Policy] = {}
    errors: list[BaseException] = []

    def worker(name: str, retries: int) -> None:
        try:
            seen[f"{name}-start"] = current_policy()  # a new thread starts with an empty context
            with policy(retries=retries):
                inside.wait()  # both threads hold their scope at the same time
                seen[name] = current_policy()
                inside.wait()
        except BaseException as error:  # pragma: no cover - reported below
            errors.append(error)

    with policy(retries=9):  # the main thread's scope is not inherited by new threads
        threads = [threading.Thread(target=worker, args=(n, r)) for n, r in (("a", 1), ("b", 2))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=10)
    assert not errors
    assert seen == {"a-start": NO_POLICY, "b-start": NO_POLICY, "a": Policy(retries=1), "b": Policy(retries=2)}


def test_copied_context_carries_the_scope() -> None:
    with policy(retries=3, deadline=30):
        context = contextvars.copy_context()
        deadline = current_deadline()
    assert context.run(current_policy) == Policy(retries=3)
    assert context.run(current_deadline) == deadline


# --- effective(): the per-request resolution ----------------------------------------------------------------


def test_effective_without_scope_uses_the_base_and_its_timeout() -> None:
    base = Policy(timeout=2.0).resolved()
    before = time.monotonic()
    rules, deadline = effective(base)
    assert rules is base
    assert before + 2.0 <= deadline <= time.monotonic() + 2.0


def test_effective_completes_an_incomplete_base() -> None:
    rules, _ = effective(Policy(retries=3))
    assert rules.complete and rules.retries == 3 and rules.timeout == 15.0


def test_effective_layers_base_scope_and_request() -> None:
    base = Policy(timeout=8, retries=2, retry_non_idempotent=True).resolved()
    with policy(retries=4, backoff_cap=1.0):
        rules, _ = effective(base, Policy(retries=0))
        assert (rules.retries, rules.retry_non_idempotent, rules.backoff_cap, rules.timeout) == (0, True, 1.0, 8.0)
        again, _ = effective(base)
        assert again is effective(base)[0]  # cached per (scope, base)
        assert again.retries == 4


def test_effective_deadline_is_the_smallest_of_timeout_and_scope_deadline() -> None:
    base = DEFAULT_POLICY  # 15 s timeout
    with policy(deadline=1.0):
        scope_deadline = current_deadline()
        _, deadline = effective(base)
        assert deadline == scope_deadline
        with policy(timeout=0.5):  # the call's own timeout is smaller than what the scope has left
            before = time.monotonic()
            _, deadline = effective(base)
            assert scope_deadline is not None
            assert before + 0.5 <= deadline < scope_deadline
        _, deadline = effective(base, Policy(deadline=0.25))  # request deadline behaves as a timeout
        assert deadline < scope_deadline


def test_effective_with_expired_deadline_returns_the_past() -> None:
    with policy(deadline=0):
        _, deadline = effective(DEFAULT_POLICY)
    assert deadline <= time.monotonic()


def test_effective_infinite_timeout_and_no_scope_is_infinite() -> None:
    _, deadline = effective(Policy(timeout=math.inf).resolved())
    assert deadline == math.inf
