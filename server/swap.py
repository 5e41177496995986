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
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from deploy import registry
from deploy.channel import ServingWatcher
from deploy.settings import DeploySettings
from deploy.state import PolicyRef, ServingState

from .engine.base import Engine, UnknownModelVersion, VersionInUse
from .metrics import Metrics

log = logging.getLogger(__name__)

# A version that failed to load is tried again (from the same directory) after this long, when
# a state that still wants it arrives: long enough not to flood the registry with failures.
RETRY_AFTER_S = 60.0
DRAIN_POLL_S = 0.2  # how often a replaced version is checked for streams still running
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


def replica_name(host: str, port: int) -> str:
    """How the registry names this replica: hostname:port (hostname:pid when the port is
    chosen by the OS, as in tests, where the settings do not know it)."""
    hostname = socket.gethostname()
    return f"{hostname}:{port}" if port else f"{hostname}:pid{os.getpid()}"


def verify_policy_files(ref: PolicyRef) -> None:
    """Refuse a checkpoint whose files are missing or altered, before any weight is read.

    Checkpoints carry sha256s in their manifest; a base model directory named by MODEL has no
    manifest and must at least look loadable.
    """
    from deploy import checkpoint as checkpoint_format
    from deploy.base_model import is_model_dir

    path = Path(ref.path)
    if (path / checkpoint_format.MANIFEST_NAME).exists() or ref.kind == "lora":
        checkpoint_format.verify(path)
    elif not is_model_dir(path):
        raise checkpoint_format.CheckpointNotFound(
            f"the base model directory {path} is missing or lacks config.json and weights", path=path
        )


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
        self._failed: dict[str, tuple[str, float]] = {}  # version -> (path, monotonic time)
        self._draining: dict[str, asyncio.Task] = {}  # replaced version -> its drain-and-unload
        self._wake = asyncio.Event()
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
        served = engine.versions()
        return engine.default_version == state.serving.id and all(v in served for v in state.live_versions)

    # -- what the watcher reports ---------------------------------------------------------------

    def _heard(self, state: ServingState) -> None:
        # Only the newest state matters: states heard while a load runs are coalesced.
        self.state = state
        self._heard_at = time.monotonic()
        self._wake.set()

    async def _reconcile_forever(self) -> None:
        while True:
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
        if state is None or state.serving is None or not engine.ready:
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
                await asyncio.to_thread(verify_policy_files, ref)
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
