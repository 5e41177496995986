"""The server's side of a promotion: make this replica's engine serve what the registry says.

`SwapController` listens (deploy.channel.ServingWatcher: LISTEN with reconnects, the state
re-read on every (re)connect) and reconciles the engine with every state it hears, in a task of
its own so the listener never waits for weights to load:

1. every live version (the serving one, then the canary) that the engine lacks is verified
   against its manifest and loaded next to the versions already served (the local engine
   applies a LoRA adapter to the one base weight set it holds, so this costs the adapter's
   file, not the model: see server/engine/local.py);
2. the serving version becomes the engine's default: new requests get it, requests in flight
   finish on the weights they started with;
3. versions no longer live get no new conversations and are unloaded once their streams have
   finished (a rollback before that only changes the default again: nothing to load).

A load that fails changes nothing on the engine: the previous policy keeps serving. The failure
is logged, counted in /metrics, shown by /health and /api/version, and recorded in the registry
(`python -m deploy status` lists it). A failed version is not retried for the same directory
until `retry_after_s` has passed, so a state heard twice (the watcher may deliver the same one
again after a reconnect) neither reloads nor records twice.

A remote engine also follows the registry's engine URL (blue/green, deploy/endpoints.py), before
the versions, so that they are loaded and checked on the engine that will serve them: the URL
asked for this replica is probed and checked to serve every version (RemoteEngine.
switch_endpoint), new requests go there, streams in flight finish on the old one. A URL that
fails the check leaves the old one serving; like a failed load it is logged, counted, shown and
recorded, and the same request is not tried again until `retry_after_s` has passed (a new
request, even for the same URL, is tried at once).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from deploy import endpoints, registry
from deploy.channel import ServingWatcher
from deploy.settings import DeploySettings
from deploy.state import EngineEndpoint, PolicyRef, ServingState

from .engine.base import Engine, UnknownModelVersion, VersionInUse
from .metrics import Metrics

log = logging.getLogger(__name__)

# A version that failed to load is tried again (from the same directory) after this long, when
# a state that still wants it arrives: long enough not to flood the registry with failures.
RETRY_AFTER_S = 60.0
DRAIN_POLL_S = 0.2  # how often a replaced version is checked for streams still running
ENGINE_POLL_S = 0.5  # while the engine is not ready, the registry's state is applied once it is
RECORD_TIMEOUT_S = 5.0  # a registry record waits this long for a connection, then is dropped


@dataclass(frozen=True)
class Swap:
    """One change of the version new conversations get on this replica."""

    previous: str | None
    version: str
    at: datetime  # UTC, when new requests started getting `version`
    load_s: float | None  # seconds to verify and load it; None: it was already loaded (a canary)
    heard_to_swap_s: float  # from hearing the change (NOTIFY or a re-read) to serving it
    draining: int  # requests still running on `previous` at that moment (they finish there)


@dataclass(frozen=True)
class LoadFailure:
    """A version this replica could not load; what served before kept serving."""

    version: str
    path: str
    at: datetime  # UTC
    error: str


@dataclass(frozen=True)
class EngineSwitch:
    """A change of the remote engine URL new requests go to."""

    previous: str
    url: str
    at: datetime  # UTC, when new requests started going to `url`
    check_s: float  # seconds to probe `url` and check it serves every version (adapters loaded)
    draining: int  # requests still streaming from `previous` at that moment (they finish there)
    request_id: int  # the registry's request (deploy engine-url) it carried out


@dataclass(frozen=True)
class EngineSwitchFailure:
    """An engine URL this replica refused; the previous one kept serving."""

    url: str
    at: datetime  # UTC
    error: str
    request_id: int


def replica_name(host: str, port: int) -> str:
    """How the registry names this replica: hostname:port (hostname:pid when the port is
    chosen by the OS, as in tests, where the settings do not know it)."""
    hostname = socket.gethostname()
    return f"{hostname}:{port}" if port else f"{hostname}:pid{os.getpid()}"


class SwapController:
    """Keeps one engine serving the registry's state. `start()` it once the engine is ready."""

    def __init__(
        self,
        engine: Engine,
        database_url: str,
        pool,
        *,
        replica: str,
        metrics: Metrics | None = None,
        drain_timeout_s: float | None = 600.0,
        retry_after_s: float = RETRY_AFTER_S,
        listen: DeploySettings | None = None,
    ) -> None:
        self.engine = engine
        self.pool = pool  # for recording load results in the registry
        self.replica = replica
        self.metrics = metrics
        # Streams on a replaced version get this long to finish before they are cancelled.
        self.drain_timeout_s = drain_timeout_s
        self.retry_after_s = retry_after_s
        self.watcher = (
            ServingWatcher.from_settings(database_url, self._heard, listen)
            if listen is not None
            else ServingWatcher(database_url, self._heard)
        )

        self.state: ServingState | None = None  # the registry's state as last heard
        self.last_swap: Swap | None = None
        self.last_failure: LoadFailure | None = None
        self.last_engine_switch: EngineSwitch | None = None
        self.last_engine_failure: EngineSwitchFailure | None = None
        self._engine_request_done: int | None = None  # the engine URL request carried out
        self._engine_failed: tuple[int, float] | None = None  # (request id, monotonic time)
        self._failed: dict[str, tuple[str, float]] = {}  # version -> (path, monotonic time)
        self._draining: dict[str, asyncio.Task] = {}  # replaced version -> its drain-and-unload
        self._wake = asyncio.Event()
        self._engine_not_ready = False  # the last state waits for the engine to become ready
        self._heard_at = 0.0  # time.monotonic() of the newest state
        self._reconciler: asyncio.Task | None = None

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        if self._reconciler is None:
            self._reconciler = asyncio.create_task(self._reconcile_forever(), name="swap-reconciler")
            self.watcher.start()

    async def stop(self) -> None:
        await self.watcher.stop()
        tasks = [t for t in (self._reconciler, *self._draining.values()) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._reconciler = None

    @property
    def listening(self) -> bool:
        return self.watcher.connected.is_set()

    @property
    def in_sync(self) -> bool:
        """The engine serves what the registry says: its serving version as the default, and the
        canary loaded next to it."""
        state, engine = self.state, self.engine
        if state is None or state.serving is None or not engine.ready:
            return False
        if self.engine_url_wanted is not None and self._engine_request_done != self.engine_url_wanted.id:
            return False  # a remote engine not (yet) on the URL asked for
        served = engine.versions()
        return engine.default_version == state.serving.id and all(v in served for v in state.live_versions)

    @property
    def engine_url_wanted(self) -> EngineEndpoint | None:
        """The registry's engine URL request for this replica, when its engine is remote."""
        return self._engine_url_in(self.state)

    def _engine_url_in(self, state: ServingState | None) -> EngineEndpoint | None:
        if state is None or not hasattr(self.engine, "switch_endpoint"):
            return None  # nothing heard yet, or a local engine
        return state.engine_endpoint(self.replica)

    # -- what the watcher reports ---------------------------------------------------------------

    def _heard(self, state: ServingState) -> None:
        # Only the newest state matters: states heard while a load runs are coalesced.
        self.state = state
        self._heard_at = time.monotonic()
        self._wake.set()

    async def _reconcile_forever(self) -> None:
        while True:
            if self._engine_not_ready:
                # A remote engine that is down: apply the state once it answers, not at the
                # next notification (there may be none for a long while).
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), ENGINE_POLL_S)
                if not self._wake.is_set() and not self.engine.ready:
                    continue
            else:
                await self._wake.wait()
            self._wake.clear()
            state, heard_at = self.state, self._heard_at
            try:
                await self._reconcile(state, heard_at)
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug or an engine refusing: keep serving, keep listening
                log.exception("could not apply the serving state %s", state)

    async def _reconcile(self, state: ServingState | None, heard_at: float) -> None:
        engine = self.engine
        if state is None:
            return
        await self._follow_engine_url(state)
        self._engine_not_ready = not engine.ready
        if state.serving is None or not engine.ready:
            return
        outcomes: list[tuple[str, float, str | None]] = []  # (version, seconds, error)
        # The serving version first: a canary that loads slowly must not delay a promotion.
        serving_load_s = await self._load_if_missing(state.serving, outcomes)
        self._make_default(state.serving.id, serving_load_s, heard_at)
        if state.canary is not None:
            await self._load_if_missing(state.canary, outcomes)
        self._unload_stale(state)
        # Recorded once the engine has changed: a swap waits for no database write.
        for version, seconds, error in outcomes:
            await self._record(version, ok=error is None, seconds=seconds, error=error)

    def _should_try(self, ref: PolicyRef) -> bool:
        failed = self._failed.get(ref.id)
        if failed is None or failed[0] != ref.path:
            return True
        return time.monotonic() - failed[1] >= self.retry_after_s

    # -- the three steps ------------------------------------------------------------------------

    async def _load_if_missing(
        self, ref: PolicyRef, outcomes: list[tuple[str, float, str | None]]
    ) -> float | None:
        """Load `ref` unless it is served already (or failed recently); the seconds it took,
        None when nothing was loaded."""
        if ref.id in self.engine.versions() or not self._should_try(ref):
            return None
        draining = self._draining.get(ref.id)
        if draining is not None:
            # Past its drain and being unloaded right now: the engine frees it, then it reloads.
            await asyncio.wait({draining})
        started = time.monotonic()
        log.info("replica %s loading %s (%s) from %s", self.replica, ref.id, ref.kind, ref.path)
        try:
            if not self.engine.verifies_checkpoints:  # else it does, as it reads them: hash once
                await asyncio.to_thread(registry.verify_files, ref)
            await self.engine.load_version(ref.id, ref.path)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            seconds = time.monotonic() - started
            error = f"{type(exc).__name__}: {exc}"
            self._failed[ref.id] = (ref.path, time.monotonic())
            self.last_failure = LoadFailure(ref.id, ref.path, datetime.now(UTC), error)
            outcomes.append((ref.id, seconds, error))
            if self.metrics:
                self.metrics.swap_failures.inc()
            log.error(
                "replica %s could not load %s from %s (%.2f s); %s keeps serving: %s",
                self.replica, ref.id, ref.path, seconds, self.engine.default_version, error,
            )
            return None
        seconds = time.monotonic() - started
        self._failed.pop(ref.id, None)
        outcomes.append((ref.id, seconds, None))
        if self.metrics:
            self.metrics.version_load_seconds.observe(seconds)
        log.info("replica %s loaded %s (%s) in %.2f s", self.replica, ref.id, ref.kind, seconds)
        return seconds

    def _make_default(self, version: str, load_s: float | None, heard_at: float) -> None:
        engine = self.engine
        previous = engine.default_version
        if version == previous or version not in engine.versions():
            return  # already so, or it failed to load: what served keeps serving
        draining = engine.in_flight(previous)
        engine.set_default_version(version)
        self.last_swap = Swap(previous, version, datetime.now(UTC), load_s,
                              time.monotonic() - heard_at, draining)
        if self.metrics:
            self.metrics.swaps.inc()
        log.info("replica %s serves %s to new requests (was %s; %d requests finish there)",
                 self.replica, version, previous, draining)

    def _unload_stale(self, state: ServingState) -> None:
        live = {*state.live_versions, self.engine.default_version}
        for version in self.engine.versions():
            if version not in live and version not in self._draining:
                self._draining[version] = asyncio.create_task(
                    self._drain(version), name=f"drain-{version}"
                )

    def _still_wanted(self, version: str) -> bool:
        state = self.state
        return version == self.engine.default_version or (
            state is not None and version in state.live_versions
        )

    async def _drain(self, version: str) -> None:
        """Unload `version` once its requests have finished (cancelling those left after
        drain_timeout_s). Until then it stays loaded and accepting: no conversation is routed to
        it any more (it is not live), so only its own streams run there, and a rollback to it
        during the drain is just a change of the default, with nothing to load."""
        engine = self.engine
        log.info("replica %s: %s gets no new conversations; unloading it once its %d requests finish",
                 self.replica, version, engine.in_flight(version))
        deadline = None if self.drain_timeout_s is None else time.monotonic() + self.drain_timeout_s
        try:
            while engine.in_flight(version) and (deadline is None or time.monotonic() < deadline):
                if self._still_wanted(version):
                    return
                await asyncio.sleep(DRAIN_POLL_S)
            if self._still_wanted(version):
                return
            left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            await engine.unload_version(version, timeout=left)
        except (UnknownModelVersion, VersionInUse) as exc:
            log.info("not unloading %s: %s", version, exc)
        except Exception:
            log.exception("unloading %s failed", version)
        finally:
            self._draining.pop(version, None)

    @property
    def draining(self) -> list[str]:
        """Versions no longer live whose last streams are finishing here."""
        return sorted(self._draining)

    # -- blue/green: the remote engine's URL -----------------------------------------------------

    async def _follow_engine_url(self, state: ServingState) -> None:
        """Switch a remote engine to the URL the registry asks this replica to use."""
        request = self._engine_url_in(state)
        if request is None or request.id == self._engine_request_done:
            return
        failed = self._engine_failed
        if failed is not None and failed[0] == request.id and time.monotonic() - failed[1] < self.retry_after_s:
            return
        engine = self.engine
        previous, draining = engine.url, engine.in_flight()
        started = time.monotonic()
        try:
            switched = await engine.switch_endpoint(request.url)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            error = str(exc) or type(exc).__name__
            self._engine_failed = (request.id, time.monotonic())
            self.last_engine_failure = EngineSwitchFailure(request.url, datetime.now(UTC), error, request.id)
            if self.metrics:
                self.metrics.engine_switch_failures.inc()
            log.error("replica %s will not send requests to the engine at %s (asked by %s); %s keeps "
                      "serving: %s", self.replica, request.url, request.actor, previous, error)
            await self._record_engine_url(request, ok=False, error=error)
            return
        seconds = time.monotonic() - started
        self._engine_request_done, self._engine_failed = request.id, None
        if switched:
            self.last_engine_switch = EngineSwitch(previous, engine.url, datetime.now(UTC), seconds,
                                                   draining, request.id)
            if self.metrics:
                self.metrics.engine_switches.inc()
            log.info("replica %s sends new requests to the engine at %s (was %s; %d requests finish "
                     "there), checked in %.2f s", self.replica, engine.url, previous, draining, seconds)
        await self._record_engine_url(request, ok=True, details={
            "previous": previous, "switched": switched, "check_s": round(seconds, 3), "draining": draining})

    async def _record_engine_url(self, request: EngineEndpoint, *, ok: bool, error: str | None = None,
                                 details: dict | None = None) -> None:
        try:
            async with self.pool.connection(timeout=RECORD_TIMEOUT_S) as conn:
                await endpoints.record_outcome(conn, request, replica=self.replica, ok=ok, error=error,
                                               details=details)
        except Exception as exc:  # the database may be the thing that is down; serving goes on
            log.warning("could not record in the registry that %s %s %s: %s", self.replica,
                        "switched to" if ok else "refused", request.url, exc)

    # -- the registry's record ------------------------------------------------------------------

    async def _record(self, version: str, *, ok: bool, seconds: float, error: str | None = None) -> None:
        try:
            async with self.pool.connection(timeout=RECORD_TIMEOUT_S) as conn:
                await registry.record_load_result(
                    conn, version, replica=self.replica, ok=ok, error=error, seconds=round(seconds, 3)
                )
        except Exception as exc:  # the database may be the thing that is down; serving goes on
            log.warning("could not record in the registry that %s %s %s: %s", self.replica,
                        "loaded" if ok else "failed to load", version, exc)
