"""Reloading a daemon's configuration on SIGHUP (docs/operations.md, "Reloading").

A reload reads the config file again and compares it with the running
configuration key by key, by the dotted names of the file (``tls.cert_file``,
``retention.window_s``). Each daemon names the keys it can change while it
runs; their new values take effect, and every other change is logged as
waiting for a restart while the running value stays. A file that does not
load (bad TOML, an unknown key, a value out of range), or a change that
cannot be applied (a certificate that does not match its key), refuses the
whole reload: nothing changes, the reason is logged, and the metrics say so.

The steps are load → plan (which keys change now, which wait) → prepare
(everything that can fail: reading certificates, building TLS contexts) →
commit (swapping in what was prepared, which cannot fail). A refused reload
therefore never leaves half of a new configuration in force.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Iterator
from concurrent.futures import Executor
from pathlib import Path
from typing import Any, Final, Generic, Protocol, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge

from protocol.errors import BlockreplError
from runtime.config import FieldValueError, LoggingConfig, TlsFiles
from runtime.errors import ConfigError
from runtime.logs import setup_logging
from runtime.service import sd_notify
from runtime.tls import ReloadableServerContext, ServerTlsChange

C = TypeVar("C")

#: Longest value a log line shows for a changed key: a path or a number fits,
#: a long list is cut (the file itself is the reference).
MAX_SHOWN_VALUE_CHARS: Final = 120


@dataclasses.dataclass(frozen=True)
class ReloadPlan(Generic[C]):
    """What a reload changes.

    Attributes:
        config: the configuration to run with: the running one with every
            reloadable change of the file applied.
        applied: dotted keys whose new values take effect now, with their
            old and new values.
        restart: dotted keys whose new values wait for a restart.
    """

    config: C
    applied: tuple[tuple[str, object, object], ...]
    restart: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Prepared:
    """A reload made ready: ``commit`` swaps it in and cannot fail.

    Attributes:
        commit: makes the prepared changes take effect.
        notes: what else the daemon found changed and will apply now
            (a renewed certificate under an unchanged file name).
        restart: what else waits for a restart (a key file's new content).
    """

    commit: Callable[[], None]
    notes: tuple[str, ...] = ()
    restart: tuple[str, ...] = ()


def plan_reload(running: C, loaded: C, reloadable: Collection[str]) -> ReloadPlan[C]:
    """Compare two configurations and build the one to run with.

    Args:
        running: the configuration in force.
        loaded: the configuration just read from the file.
        reloadable: dotted keys (``"logging"``, ``"retention.window_s"``) that
            may change while the daemon runs; a key stands for everything
            under it.

    Raises:
        ConfigError: the running configuration with the reloadable changes
            applied breaks a rule between keys (for example a new low mark
            above a high mark that waits for a restart).
    """
    merger = _Merger(frozenset(reloadable))
    try:
        merged = merger.merge(running, loaded, "", under_reloadable=False)
    except FieldValueError as exc:
        raise ConfigError(
            f"the reloadable changes do not fit the running configuration: {exc}"
        ) from exc
    return ReloadPlan(merged, tuple(merger.applied), tuple(merger.restart))


class _Merger:
    """Walks two configurations field by field, sorting each change."""

    def __init__(self, reloadable: frozenset[str]) -> None:
        self.reloadable = reloadable
        self.applied: list[tuple[str, object, object]] = []
        self.restart: list[str] = []

    def merge(self, running: Any, loaded: Any, key: str, *, under_reloadable: bool) -> Any:
        """The value to run with at ``key``: ``loaded`` if it may change now, else ``running``."""
        if running == loaded:
            return running
        now = under_reloadable or key in self.reloadable
        if (
            dataclasses.is_dataclass(running)
            and not isinstance(running, type)
            and type(running) is type(loaded)
        ):
            changes = {}
            for field in dataclasses.fields(running):
                old, new = getattr(running, field.name), getattr(loaded, field.name)
                name = f"{key}.{field.name}" if key else field.name
                merged = self.merge(old, new, name, under_reloadable=now)
                if merged is not old:
                    changes[field.name] = merged
            # replace() checks the mixed result against the dataclass's own rules.
            return dataclasses.replace(running, **changes) if changes else running
        if now:
            self.applied.append((key, running, loaded))
            return loaded
        self.restart.append(key)
        return running


class ReloadMetrics:
    """The reload series of one daemon, and the expiry of the certificates a reload swaps.

    ``PREFIX_config_last_reload_success`` and its timestamp mirror Prometheus's
    own ``prometheus_config_last_reload_successful``, so the same alert fits.
    """

    def __init__(self, registry: CollectorRegistry, prefix: str) -> None:
        self.reloads = Counter(
            f"{prefix}_config_reloads",
            "Configuration reloads by result (applied, refused).",
            ["result"],
            registry=registry,
        )
        for result in ("applied", "refused"):
            self.reloads.labels(result)
        self.last_success = Gauge(
            f"{prefix}_config_last_reload_success",
            "1 if the last configuration reload was applied (or none was asked), 0 if refused.",
            registry=registry,
        )
        self.last_success.set(1)
        self.last_success_time = Gauge(
            f"{prefix}_config_last_reload_success_timestamp_seconds",
            "When the configuration was last loaded successfully (start or reload).",
            registry=registry,
        )
        self.last_success_time.set(time.time())
        self.restart_pending = Gauge(
            f"{prefix}_config_restart_pending",
            "1 while the configuration file holds changes that take effect only at a restart.",
            registry=registry,
        )
        self.certificate_expiry = Gauge(
            f"{prefix}_tls_certificate_expiry_timestamp_seconds",
            "notAfter of the TLS certificate in use, by role (server; client: toward the "
            "master target).",
            ["role"],
            registry=registry,
        )


async def reload_config(
    *,
    path: Path,
    load: Callable[[Path], C],
    running: C,
    reloadable: Collection[str],
    prepare: Callable[[ReloadPlan[C]], Awaitable[Prepared]],
    metrics: ReloadMetrics,
    log: logging.Logger,
) -> C | None:
    """Reload ``path``: load, plan, prepare, commit, and report.

    Args:
        path: the config file the daemon was started with.
        load: reads and checks a config file (raises ConfigError).
        running: the configuration in force.
        reloadable: see :func:`plan_reload`.
        prepare: the daemon's part: does everything that can fail for the
            plan and returns the commit; raises BlockreplError to refuse.
        metrics: where the outcome is counted.
        log: the daemon's logger.

    Returns:
        The configuration now in force, or None if the reload was refused
        (the running configuration stays).
    """
    log.info("reloading %s", path)
    try:
        loaded = await asyncio.to_thread(load, path)
        plan = plan_reload(running, loaded, reloadable)
        prepared = await prepare(plan)
    except BlockreplError as exc:
        log.error("reload refused, the running configuration stays: %s", exc.message)
        metrics.reloads.labels("refused").inc()
        metrics.last_success.set(0)
        sd_notify(f"STATUS=reload refused: {_one_line(exc.message)}")
        return None
    prepared.commit()
    for key, old, new in plan.applied:
        log.info("reload: %s changed from %s to %s: in effect now", key, _show(old), _show(new))
    for note in prepared.notes:
        log.info("reload: %s", note)
    waiting = (*plan.restart, *prepared.restart)
    for key in waiting:
        log.warning("reload: %s changed: takes effect at the next restart", key)
    if not (plan.applied or prepared.notes or waiting):
        log.info("reload: nothing changed")
    metrics.reloads.labels("applied").inc()
    metrics.last_success.set(1)
    metrics.last_success_time.set(time.time())
    metrics.restart_pending.set(1 if waiting else 0)
    status = "running; restart to apply: " + ", ".join(waiting) if waiting else "running"
    sd_notify(f"STATUS={_one_line(status)}")
    return plan.config


@dataclasses.dataclass(frozen=True)
class FileContent:
    """A file's content as the daemon loaded it, to tell a reload when it changed.

    For files read only at start (the key file): a new key ring under the
    same name waits for a restart, and the reload says so.
    """

    path: Path
    sha256: str

    @classmethod
    def read(cls, path: Path) -> FileContent:
        """The digest of ``path`` now (blocking; a small file)."""
        return cls(path, hashlib.sha256(path.read_bytes()).hexdigest())

    def waits_for_restart(self, key: str, path: Path) -> tuple[str, ...]:
        """The restart note for config ``key`` if ``path`` is this file with new content.

        A different path is a key change, which the plan reports itself.
        Blocking: rereads the file.
        """
        if path != self.path or FileContent.read(path).sha256 == self.sha256:
            return ()
        return (f"the content of {key} {path}",)


def changed_keys(plan: ReloadPlan[Any]) -> Iterator[str]:
    """The dotted keys a plan applies now."""
    return (key for key, _, _ in plan.applied)


def touches(plan: ReloadPlan[Any], prefix: str) -> bool:
    """Whether the plan applies a change to ``prefix`` or a key under it."""
    return any(key == prefix or key.startswith(prefix + ".") for key in changed_keys(plan))


def _show(value: object) -> str:
    shown = str(value)
    if len(shown) > MAX_SHOWN_VALUE_CHARS:
        return shown[: MAX_SHOWN_VALUE_CHARS - 3] + "..."
    return shown


def _one_line(text: str) -> str:
    """A STATUS= value: one line (sd_notify separates fields by newlines)."""
    return " ".join(text.split())


# --- what every daemon's reload does ---------------------------------------------------------


class DaemonConfig(Protocol):
    """The keys every daemon's configuration has and every reload reads again."""

    @property
    def tls(self) -> TlsFiles: ...

    @property
    def key_file(self) -> Path: ...

    @property
    def logging(self) -> LoggingConfig: ...


D = TypeVar("D", bound=DaemonConfig)


@dataclasses.dataclass(frozen=True)
class ServerReload:
    """The part of a reload every daemon makes, prepared: the server's TLS files
    read again (a renewed certificate usually keeps its file name), the key file
    compared (a new key ring under the same name waits for a restart), and the
    log settings if they changed. :meth:`commit` cannot fail."""

    server: ServerTlsChange
    restart: tuple[str, ...]
    logging: LoggingConfig | None

    @property
    def notes(self) -> tuple[str, ...]:
        """Lines for the log: a renewed server certificate."""
        return (self.server.note,) if self.server.note else ()

    def commit(self, metrics: ReloadMetrics) -> None:
        if self.logging is not None:
            setup_logging(self.logging)
        self.server.commit()
        metrics.certificate_expiry.labels("server").set(self.server.certificate.not_after_s)


async def prepare_server_reload(
    plan: ReloadPlan[D],
    *,
    server_tls: ReloadableServerContext,
    key_file: FileContent,
    executor: Executor,
) -> ServerReload:
    """Read what every reload reads again, on ``executor`` (the files are read whole).

    Raises:
        TlsSetupError: a TLS file cannot be used; the running context stays.
    """
    new = plan.config
    loop = asyncio.get_running_loop()
    server = await loop.run_in_executor(executor, server_tls.prepare, new.tls)
    restart = await loop.run_in_executor(
        executor, key_file.waits_for_restart, "key_file", new.key_file
    )
    return ServerReload(server, restart, new.logging if touches(plan, "logging") else None)


class ReloadingDaemon(Protocol[C]):
    """A daemon as :func:`reload_daemon` sees it."""

    config: C
    reloads: ReloadMetrics

    async def prepare_reload(self, plan: ReloadPlan[C]) -> Prepared:
        """Everything of a reload that can fail for ``plan``; the commit it returns cannot."""
        ...


async def reload_daemon(
    daemon: ReloadingDaemon[C],
    path: Path,
    *,
    load: Callable[[Path], C],
    reloadable: Collection[str],
    log: logging.Logger,
) -> bool:
    """Reread ``path`` and apply what can change while ``daemon`` runs (SIGHUP).

    Returns:
        False if the reload was refused (the reason is logged and the
        running configuration stays), True otherwise.
    """
    running = await reload_config(
        path=path,
        load=load,
        running=daemon.config,
        reloadable=reloadable,
        prepare=daemon.prepare_reload,
        metrics=daemon.reloads,
        log=log,
    )
    if running is None:
        return False
    daemon.config = running
    return True
