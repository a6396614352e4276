"""The fault suite: real processes, real Redis, injected faults, a verdict per scenario.

``python -m benchmarks.faults`` runs every scenario (``--quick``: the short ones;
``--scenarios a,b``; ``--seed N``) and prints, per scenario, its seed, its criterion, its
figures and PASS or FAIL. ``pytest -m faults`` runs the long ones; the quick ones also run in
the default test command (``tests/test_faults.py``). docs/reliability.md holds the table of
the last run and the machine it ran on.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from benchmarks.faults.delivery import (
    client_cuts,
    cross_session,
    gateway_kill,
    hostile_sse,
    partition,
    reconnect_storm,
    slow_client,
)
from benchmarks.faults.harness import FaultEnv, Outcome
from benchmarks.faults.outage import (
    AOF_ALWAYS,
    EMPTY_BOUND_S,
    lost_reply_first,
    lost_reply_whole,
    redis_restart_aof,
    redis_restart_empty,
)
from benchmarks.faults.pipeline import poison_entry, processor_kill, trimmed_pending, worker_kill
from benchmarks.faults.soak import soak

__all__ = ["SCENARIOS", "Scenario"]


@dataclass(frozen=True)
class Scenario:
    """A fault, the criterion it must meet, and whether it is quick (default test run)."""

    name: str
    criterion: str
    run: Callable[[FaultEnv, int], Awaitable[Outcome]]
    quick: bool = True
    redis_args: tuple[str, ...] = ()  # the scenario's redis-server options (persistence)


SCENARIOS = [
    Scenario("client-cuts", "10 clients drop 3 times each at random points and resume on a "
             "random one of 2 gateways: every token exactly once, in order, then end", client_cuts),
    Scenario("gateway-kill", "the gateway holding 10 clients is SIGKILLed mid-answer and "
             "restarted: every client resumes elsewhere, every token exactly once",
             gateway_kill),
    Scenario("worker-kill", "the worker is SIGKILLed mid-answer: every stream ends (worker_lost "
             "right after the last event written), no seq twice", worker_kill),
    Scenario("processor-kill", "a processor process is SIGKILLed holding entries: a survivor "
             "takes them over, analytics exact (500 generations, 1,500 tokens)", processor_kill),
    Scenario("poison-entry", "an undecodable pipeline entry and job are dead-lettered; the next "
             "answer is delivered exactly and counted", poison_entry),
    Scenario("trimmed-pending", "processors stalled past the cap with 100 entries pending on a "
             "dead consumer: processed + lost >= added, lost > 0, lag and pending back to 0",
             trimmed_pending),
    Scenario("slow-client", "a reader at ~10 % of a 2 MB/s session is cut (slow_client, 128 KB "
             "budget) and its resume continues exactly or starts with gap", slow_client),
    Scenario("hostile-sse", "200 tokens made of SSE framing (newlines, event:, id:, NUL, "
             "U+2028) arrive as the same text, in order", hostile_sse),
    Scenario("cross-session", "a Last-Event-ID of session A used on session B: none of A's "
             "events, B's answer whole", cross_session),
    Scenario("redis-restart-empty", "Redis SIGKILLed mid-answer, back empty: all 30 clients "
             f"(10 sessions) get gap and their stream ends (the rest then end, or "
             f"generation_lost) within {EMPTY_BOUND_S:.0f} s", redis_restart_empty),
    Scenario("redis-restart-aof", "Redis with appendfsync always SIGKILLed mid-answer and "
             "restarted with its data: 10 clients of 5 answers get every token exactly once "
             "and end, no worker_lost", redis_restart_aof, redis_args=AOF_ALWAYS),
    Scenario("lost-reply-whole", "3 producer round trips (pipeline entry + append) reach "
             "Redis whole, their replies lost with the connection: every token once to every "
             "client, each seq once in the stream, each batch once in the pipeline",
             lost_reply_whole),
    Scenario("lost-reply-first", "3 producer round trips cut after their first command (the "
             "pipeline entry), replies lost: every token once to every client, each seq once "
             "in the stream, each batch once in the pipeline", lost_reply_first),
    Scenario("partition", "the gateway loses Redis for 5 s mid-answer (a proxy holds every "
             "byte): 10 clients get every token exactly once", partition),
    Scenario("reconnect-storm", "200 clients lose their gateway at once (SIGKILL) and all "
             "resume on the other: every token exactly once", reconnect_storm, quick=False),
    Scenario("soak", "10 generations/s for 60 s, retention 5 s: keys, Redis memory and gateway "
             "RSS level off (last third <= 1.25 x middle third); no key without the prefix or "
             "outliving its TTL; all per-generation keys gone 15 s after", soak, quick=False),
]  # fmt: skip
