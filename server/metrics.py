"""Prometheus metrics at /metrics: what operators watch while the flywheel turns.

One registry per app (tests start many apps in one process). Answers are counted by how they
ended and by the model version that wrote them, so a canary's error or cancel rate shows next
to the serving policy's; the engine's own counters (batch sizes, queue) are read at scrape time.
Hot swaps are counted (done and failed) and the versions served are a gauge, so a replica left
behind after a promotion stands out on a dashboard. So are a remote engine's blue/green switches
and the URLs it streams from.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, make_asgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector


class Metrics:
    def __init__(
        self, engine: Callable[[], object | None], swaps: Callable[[], object | None] = lambda: None
    ):
        self.registry = CollectorRegistry()
        self.answers = Counter(
            "flywheel_answers",
            "Answers stored, by finish reason and model version.",
            ["finish_reason", "model_version"],
            registry=self.registry,
        )
        self.answer_tokens = Counter(
            "flywheel_answer_tokens",
            "Tokens generated into stored answers, by model version.",
            ["model_version"],
            registry=self.registry,
        )
        self.time_to_first_token = Histogram(
            "flywheel_time_to_first_token_seconds",
            "From the request to the first streamed text.",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30),
            registry=self.registry,
        )
        self.feedback = Counter(
            "flywheel_feedback",
            "Feedback stored, by kind (thumb_up, thumb_down, compare, demonstration).",
            ["kind"],
            registry=self.registry,
        )
        self.refusals = Counter(
            "flywheel_refusals",
            "Requests and frames refused, by error code.",
            ["code"],
            registry=self.registry,
        )
        self.swaps = Counter(
            "flywheel_swaps",
            "Times this replica changed the version new requests get (promotion, rollback).",
            registry=self.registry,
        )
        self.swap_failures = Counter(
            "flywheel_swap_failures",
            "Versions this replica failed to verify or load; the previous one kept serving.",
            registry=self.registry,
        )
        self.engine_switches = Counter(
            "flywheel_engine_switches",
            "Times this replica's remote engine moved new requests to another URL (deploy engine-url).",
            registry=self.registry,
        )
        self.engine_switch_failures = Counter(
            "flywheel_engine_switch_failures",
            "Engine URLs this replica refused (not answering, or lacking a served version); the "
            "previous URL kept serving.",
            registry=self.registry,
        )
        self.version_load_seconds = Histogram(
            "flywheel_version_load_seconds",
            "Verifying and loading a promoted version, up to its being ready to serve.",
            buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120),
            registry=self.registry,
        )
        self.registry.register(_EngineCollector(engine))
        self.registry.register(_ServingCollector(engine, swaps))
        self.app = make_asgi_app(registry=self.registry)


class _EngineCollector(Collector):
    """The engine's counters at scrape time (nothing while the model loads)."""

    def __init__(
        self, engine: Callable[[], object | None], swaps: Callable[[], object | None] = lambda: None
    ):
        self.engine = engine

    def collect(self):
        engine = self.engine()
        stats = getattr(engine, "stats", None)
        if stats is None or not getattr(engine, "ready", False):
            return
        s = stats()
        active = GaugeMetricFamily("flywheel_engine_active", "Sequences holding a batch slot.")
        active.add_metric([], s.active)
        waiting = GaugeMetricFamily("flywheel_engine_waiting", "Requests waiting for a slot.")
        waiting.add_metric([], s.waiting)
        generated = CounterMetricFamily("flywheel_engine_generated_tokens", "Tokens generated.")
        generated.add_metric([], s.generated_tokens)
        prefilled = CounterMetricFamily("flywheel_engine_prefill_tokens", "Prompt tokens run through the model.")
        prefilled.add_metric([], s.prefill_tokens)
        reused = CounterMetricFamily(
            "flywheel_engine_reused_prompt_tokens",
            "Prompt tokens not prefilled: a reused KV cache row already held them (the same prefix).",
        )
        reused.add_metric([], s.reused_prompt_tokens)
        steps = CounterMetricFamily(
            "flywheel_engine_decode_steps",
            "Decode forward passes, by how many sequences they carried.",
            labels=["batch_size"],
        )
        for size, count in sorted(s.decode_batch_sizes.items()):
            steps.add_metric([str(size)], count)
        yield from (active, waiting, generated, prefilled, reused, steps)


class _ServingCollector(Collector):
    """What this replica serves, read at scrape time: one series per version it accepts
    requests for, by role, and whether its deploy listener is connected."""

    def __init__(self, engine: Callable[[], object | None], swaps: Callable[[], object | None]):
        self.engine = engine
        self.swaps = swaps

    def collect(self):
        engine, swaps = self.engine(), self.swaps()
        if engine is not None and getattr(engine, "ready", False):
            state = getattr(swaps, "state", None)
            canary = state.canary.id if state is not None and state.canary is not None else None
            served = GaugeMetricFamily(
                "flywheel_serving_version",
                "1 for each model version this replica accepts requests for, by role (default: "
                "what new conversations get; canary; draining: replaced, finishing its streams; "
                "other: named by API requests only).",
                labels=["version", "role"],
            )
            default = engine.default_version
            draining = set(getattr(swaps, "draining", ()))
            for version in engine.versions():
                if version == default:
                    role = "default"
                elif version == canary:
                    role = "canary"
                else:
                    role = "draining" if version in draining else "other"
                served.add_metric([version, role], 1)
            yield served
        url = getattr(engine, "url", None)
        if url is not None:
            endpoints = GaugeMetricFamily(
                "flywheel_engine_endpoint",
                "1 for each remote engine URL this replica streams from, by role (current: where "
                "new requests go; draining: an old one finishing its streams after a switch).",
                labels=["url", "role"],
            )
            endpoints.add_metric([url, "current"], 1)
            for old in engine.draining_urls():
                endpoints.add_metric([old, "draining"], 1)
            yield endpoints
        if swaps is not None:
            listening = GaugeMetricFamily(
                "flywheel_deploy_listener_connected",
                "1 while this replica LISTENs for promotions (0: reconnecting to the database).",
            )
            listening.add_metric([], 1 if swaps.listening else 0)
            yield listening
