"""What the engine counts for operators, in Prometheus' terms (served by ``bot.operations``).

Each :class:`Metrics` has its own collector registry, so two engines in one process (the tests,
the bench) never mix their figures.  Names follow Prometheus' conventions: counters end in
``_total``, times are seconds.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# First tokens on a CPU take tenths of a second, whole replies up to minutes.
LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)

# Why a message got no answer: the ``reason`` label of ``localbot_messages_refused_total``.
REASONS = ("access", "rate_limited", "user_busy", "queue_full", "not_stored", "closing")


class Metrics:
    """The engine's counters, gauges and histograms."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.received = Counter(
            "localbot_messages_received",
            "Messages that reached the engine.",
            ["platform"],
            registry=r,
        )
        self.refused = Counter(
            "localbot_messages_refused",
            "Messages not answered: access lists, rate limit, full queues, storage, stopping.",
            ["platform", "reason"],
            registry=r,
        )
        self.answered = Counter(
            "localbot_messages_answered",
            "Replies generated and stored.",
            ["platform", "role"],
            registry=r,
        )
        self.failed = Counter(
            "localbot_messages_failed",
            "Replies that ended in an apology or a notice instead of an answer.",
            ["platform", "role"],
            registry=r,
        )
        self.first_token = Histogram(
            "localbot_first_token_seconds",
            "From the start of a reply (its turn come) to its first text.",
            ["role"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.reply = Histogram(
            "localbot_reply_seconds",
            "From the start of a reply to its last text.",
            ["role"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tokens = Counter(
            "localbot_tokens_generated", "Tokens of stored replies.", ["role"], registry=r
        )
        self.storage_errors = Counter(
            "localbot_storage_errors", "Database operations that failed.", registry=r
        )
        self.documents = Counter(
            "localbot_documents",
            "Posted files: read into documents, or refused (too big, unreadable, over a cap).",
            ["outcome"],
            registry=r,
        )
        self.reminders = Counter(
            "localbot_reminders",
            "Reminders delivered (on time or late), retried after a platform error, or given up.",
            ["outcome"],
            registry=r,
        )
        self.queue_depth = Gauge(
            "localbot_queue_depth",
            "Conversations with an answer queued or being written.",
            registry=r,
        )

    def watch_queue(self, depth: Callable[[], int]) -> None:
        """Read the queue depth from ``depth`` at each scrape."""
        self.queue_depth.set_function(depth)
