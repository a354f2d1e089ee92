"""SQLAlchemy implementation of :class:`RunStore`: SQLite file by default, any URL works.

The schema is created and upgraded by Alembic migrations (``migrations/``), never by
``create_all``: a store opened on an older database is upgraded in place.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import numbers
import os
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path
from typing import Any, TypeVar, cast

from sqlalchemy import (
    BigInteger,
    Integer,
    String,
    Table,
    create_engine,
    event,
    insert,
    inspect,
    select,
    update,
)
from sqlalchemy.engine import CursorResult, Engine, make_url
from sqlalchemy.exc import ArgumentError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import StaticPool

from fedpeft.common.errors import NoStore, StoreError
from fedpeft.common.keys import Phase
from fedpeft.server.store.base import (
    RESUMABLE,
    BaselineResult,
    InterruptedRun,
    LrCandidate,
    ReplyStatus,
    Resumption,
    RoundResult,
    RunInfo,
    RunOwner,
    RunStatus,
    RunStore,
    SiteResult,
    pid_alive,
    utcnow,
)
from fedpeft.server.store.models import (
    Base,
    BaselineRow,
    GlobalStateRow,
    RoundRow,
    RunResumeRow,
    RunRow,
    SiteResultRow,
)

T = TypeVar("T")
MIGRATIONS = Path(__file__).parent / "migrations"
log = logging.getLogger("fedpeft.server.store")

#: How long one SQLite statement waits for another connection's lock before it fails.
BUSY_TIMEOUT_S = 10.0
#: How long, in all, a write keeps retrying while SQLite reports the database locked: past
#: the busy timeout of each attempt, a lock held through a long checkpoint or a backup copy.
LOCK_RETRY_S = 30.0
_FIRST_DELAY_S, _MAX_DELAY_S = 0.1, 2.0
#: The PostgreSQL advisory lock key that serializes migrations (any fixed 64-bit number).
_MIGRATION_LOCK = 0x66656470656674  # "fedpeft"


def _run_info(row: RunRow) -> RunInfo:
    owner = None
    if row.owner_host is not None and row.owner_pid is not None:
        owner = RunOwner(row.owner_host, row.owner_pid)
    candidates = tuple(LrCandidate(*c) for c in json.loads(row.lr_candidates or "[]"))
    return _to(RunInfo, row, owner=owner, lr_candidates=candidates)


def _finite(value: float | None) -> float | None:
    # NaN means "undefined" (e.g. AUC of a single-class set); databases disagree on NaN, so
    # the store keeps it as NULL.
    return None if value is None or not math.isfinite(value) else float(value)


def _to(cls: type[T], row: Any, **extra: Any) -> T:
    values = {f.name: getattr(row, f.name) for f in fields(cls) if f.name not in extra}  # type: ignore[arg-type]
    return cls(**values, **extra)


def _site_values(run_id: int, sites: list[SiteResult]) -> list[dict[str, Any]]:
    """Site rows as plain values, built once: every attempt of a write sends the same (unlike
    ORM rows, which bind to one session)."""
    site_values: list[dict[str, Any]] = []
    for site in sites:
        values = {f.name: getattr(site, f.name) for f in fields(SiteResult)}
        for key in ("loss", "auc", "auprc", "accuracy", "brier", "seconds"):
            values[key] = _finite(values[key])
        values["extra"] = {k: _finite(v) for k, v in site.extra.items()}
        # The enums' plain values: every database driver takes a str.
        values["phase"], values["status"] = str(site.phase), str(site.status)
        site_values.append({"run_id": run_id, **values})
    return site_values


def _insert_sites(session: Session, site_values: list[dict[str, Any]]) -> None:
    """One statement for all the rows: the ORM sends one per row, or per pattern of empty
    fields; the table's own insert sends NULLs as they are."""
    if site_values:
        session.execute(insert(cast(Table, SiteResultRow.__table__)), site_values)


def _safe_url(url: str) -> str:
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<unparseable URL>"


def _sqlite_file(url: str) -> Path | None:
    """The file of a SQLite URL; None for any other database, in memory, or a ``file:`` URI."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        return None
    database = parsed.database
    if parsed.get_backend_name() != "sqlite" or not database or database == ":memory:":
        return None
    if database.startswith("file:") or parsed.query.get("uri"):
        return None
    return Path(database)


def _create_private(path: Path, shown: str) -> None:
    """Create an empty SQLite file readable by its owner only, whatever the umask.

    SQLite creates its ``-wal`` and ``-shm`` files with the mode of the database file, so
    they are 0600 too.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return  # another process made it first: it is theirs to have made private
    except OSError as exc:
        raise StoreError(f"cannot open store {shown}: {path}: {exc.strerror}") from None
    try:
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


def _locked(exc: BaseException | None) -> bool:
    """SQLite's SQLITE_BUSY: another connection holds the lock this statement needs."""
    return isinstance(exc, OperationalError) and "database is locked" in str(exc.orig)


def _check_fits(rows: Sequence[Base], shown: str) -> None:
    """Refuse, before anything is written, a value its column cannot hold.

    A name longer than its ``String`` column: PostgreSQL would fail the transaction with a
    driver error, SQLite would keep it against the schema. An integer outside its column
    (32 bits for ``Integer``, what PostgreSQL keeps; 64 for ``BigInteger``): the driver would
    fail with an overflow that names no field.
    """
    for row in rows:
        for column in row.__table__.columns:
            value = getattr(row, column.key)
            kind = column.type
            field = f"{row.__tablename__}.{column.name}"
            if isinstance(kind, String) and kind.length is not None and isinstance(value, str):
                if len(value) > kind.length:
                    raise StoreError(
                        f"store {shown}: {field} is {len(value)} characters long, the store "
                        f"keeps at most {kind.length}: {value[:40]!r}..."
                    )
            elif isinstance(kind, Integer) and isinstance(value, numbers.Integral):
                bits = 64 if isinstance(kind, BigInteger) else 32
                if not -(2 ** (bits - 1)) <= int(value) < 2 ** (bits - 1):
                    raise StoreError(
                        f"store {shown}: {field} = {int(value)} does not fit its {bits}-bit column"
                    )


def upgrade_schema(engine: Engine) -> None:
    """Bring the database to the newest schema with Alembic.

    On SQLite, foreign keys are off while migrating: a batch migration copies a table, drops
    the old one and renames the copy, and dropping ``runs`` with foreign keys on would
    cascade-delete every round, site row and state of every run. They are checked after.

    Processes that open one new store at once (a ServerApp and ``fedpeft run start``'s
    follower) migrate one after the other: the migration holds the database's write lock from
    its start (SQLite ``BEGIN IMMEDIATE``; a PostgreSQL advisory lock), so the next one waits,
    then finds the schema at head. Without it both created the tables, and one failed.
    """
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    sqlite = engine.dialect.name == "sqlite"
    with engine.connect() as connection:
        if sqlite:  # outside a transaction: SQLite ignores the pragma inside one
            connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
            connection.commit()
        try:
            with connection.begin():
                if sqlite:  # the driver begins lazily, and never before DDL: begin here
                    connection.exec_driver_sql("BEGIN IMMEDIATE")
                elif engine.dialect.name == "postgresql":
                    connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_MIGRATION_LOCK})")
                config.attributes["connection"] = connection
                command.upgrade(config, "head")
                if sqlite and connection.exec_driver_sql("PRAGMA foreign_key_check").first():
                    shown = engine.url.render_as_string(hide_password=True)
                    raise StoreError(f"store {shown}: migrated rows lost their run")
        finally:
            if sqlite:
                connection.exec_driver_sql("PRAGMA foreign_keys=ON")
                connection.commit()


class SqlRunStore(RunStore):
    """A run store in any SQLAlchemy database.

    ``create=False`` opens an existing store only: a missing SQLite file, or a database
    without the store's schema, is a ``StoreError`` and nothing is created. On SQLite every
    connection is in WAL mode (readers never wait for the writer) with a busy timeout of
    ``busy_timeout`` seconds, and a write that still finds the database locked is retried
    with backoff for ``lock_retry_seconds`` in all.
    """

    def __init__(
        self,
        url: str,
        *,
        create: bool = True,
        busy_timeout: float = BUSY_TIMEOUT_S,
        lock_retry_seconds: float = LOCK_RETRY_S,
    ):
        self.url = url
        self.lock_retry_seconds = lock_retry_seconds
        self._shown = _safe_url(url)
        path = _sqlite_file(url)
        if path is not None and not path.exists():
            if not create:
                raise NoStore(f"no store at {path} ({self._shown}): the file does not exist")
            _create_private(path, self._shown)
        try:
            if url in ("sqlite://", "sqlite:///:memory:"):
                engine = create_engine(
                    url, poolclass=StaticPool, connect_args={"check_same_thread": False}
                )
            else:
                engine = create_engine(url, pool_pre_ping=True)
        except (ArgumentError, ImportError) as exc:
            raise StoreError(f"cannot use store URL {self._shown}: {exc}") from None
        self.engine = engine
        self._sessions = sessionmaker(engine, expire_on_commit=False)
        try:
            if not create:
                # Before the pragmas: switching an empty file to WAL would write to it.
                found = inspect(engine).has_table("alembic_version")
                engine.dispose()
                if not found:
                    raise NoStore(f"{self._shown} holds no fedpeft store (no schema)")
            if engine.dialect.name == "sqlite":
                event.listen(engine, "connect", functools.partial(_sqlite_pragmas, busy_timeout))
            self._migrate()
        except SQLAlchemyError as exc:
            engine.dispose()
            cause = getattr(exc, "orig", None) or exc
            raise StoreError(
                f"cannot open store {self._shown}: {exc.__class__.__name__}: {cause}"
            ) from None

    def _migrate(self) -> None:
        """:func:`upgrade_schema`, tried again with backoff while SQLite reports the database
        locked (another process migrating or writing it outlasted the busy timeout, as on a
        loaded machine where several processes open one new store at once). A failed attempt
        rolls back whole: the migration is one transaction."""
        started, attempt = time.monotonic(), 1
        while True:
            try:
                upgrade_schema(self.engine)
                return
            except OperationalError as exc:
                delay = min(_FIRST_DELAY_S * 2 ** (attempt - 1), _MAX_DELAY_S)
                if not _locked(exc) or time.monotonic() - started + delay > self.lock_retry_seconds:
                    raise
                log.warning(
                    "store %s is locked by another connection while opening it (attempt %d); "
                    "retrying in %.1f s",
                    self._shown,
                    attempt,
                    delay,
                )
                self.engine.dispose()  # a fresh connection: the failed one may hold a lock
                time.sleep(delay)
                attempt += 1

    @contextmanager
    def _transaction(self) -> Iterator[Session]:
        """The one transaction boundary: commit on success, roll back and wrap on error."""
        session = self._sessions()
        try:
            yield session
            session.commit()
        except SQLAlchemyError as exc:
            session.rollback()
            detail = "database is locked" if _locked(exc) else exc.__class__.__name__
            raise StoreError(f"store {self._shown}: {detail}") from exc
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()

    def _write(self, work: Callable[[Session], T]) -> T:
        """``work`` in one transaction, tried again with backoff while the database is locked.

        Each attempt starts a fresh session, so ``work`` must build its rows itself.
        """
        started = time.monotonic()
        attempt = 1
        while True:
            try:
                with self._transaction() as session:
                    return work(session)
            except StoreError as exc:
                if not _locked(exc.__cause__):
                    raise
                waited = time.monotonic() - started
                delay = min(_FIRST_DELAY_S * 2 ** (attempt - 1), _MAX_DELAY_S)
                if waited + delay > self.lock_retry_seconds:
                    raise StoreError(
                        f"store {self._shown}: the database stayed locked by another connection "
                        f"through {attempt} attempts in {waited:.1f} s; nothing of this write "
                        "was recorded"
                    ) from exc.__cause__
                log.warning(
                    "store %s is locked by another connection (attempt %d, %.1f s); "
                    "retrying in %.1f s",
                    self._shown,
                    attempt,
                    waited,
                    delay,
                )
                time.sleep(delay)
                attempt += 1

    def create_run(
        self,
        *,
        config_json: str,
        dataset: str,
        method: str,
        model_name: str,
        model_fingerprint: str,
        trainable_params: int,
        total_params: int,
        seed: int,
        owner: RunOwner | None = None,
    ) -> int:
        owner = owner or RunOwner.current()

        def row() -> RunRow:
            return RunRow(
                created_at=utcnow(),
                status=RunStatus.RUNNING.value,
                owner_host=owner.host,
                owner_pid=owner.pid,
                config_json=config_json,
                dataset=dataset,
                method=method,
                model_name=model_name,
                model_fingerprint=model_fingerprint,
                trainable_params=trainable_params,
                total_params=total_params,
                seed=seed,
            )

        def work(s: Session) -> int:
            new = row()
            s.add(new)
            s.flush()
            return new.id

        _check_fits([row()], self._shown)
        return self._write(work)

    def finish_run(
        self, run_id: int, *, status: str, error: str | None = None, wall_seconds: float | None
    ) -> None:
        def work(s: Session) -> None:
            row = s.get(RunRow, run_id)
            if row is None:
                raise StoreError(f"no run {run_id}")
            # The enum's plain value: every database driver takes a str.
            row.status, row.error, row.finished_at = str(status), error, utcnow()
            row.wall_seconds = wall_seconds

        _check_fits([RunRow(status=status)], self._shown)
        self._write(work)

    def record_lr_choice(self, run_id: int, candidates: Sequence[LrCandidate]) -> None:
        if run_id not in {c.run for c in candidates}:
            raise StoreError(f"run {run_id} is not among the candidates it was chosen from")
        text = json.dumps([[c.run, c.lr, _finite(c.val_loss)] for c in candidates])

        def work(s: Session) -> None:
            row = s.get(RunRow, run_id)
            if row is None:
                raise StoreError(f"store {self._shown} has no run {run_id}")
            row.lr_candidates = text

        self._write(work)

    def resume_run(self, run_id: int, reason: str, owner: RunOwner | None = None) -> int:
        owner = owner or RunOwner.current()

        def work(s: Session) -> int:
            run = s.get(RunRow, run_id)
            if run is None:
                raise StoreError(f"store {self._shown} has no run {run_id}")
            if run.status not in RESUMABLE:
                raise StoreError(
                    f"run {run_id} is {run.status}: only an interrupted or failed run resumes"
                )
            last = s.scalar(
                select(RoundRow.round)
                .where(RoundRow.run_id == run_id)
                .order_by(RoundRow.round.desc())
                .limit(1)
            )
            row = RunResumeRow(
                run_id=run_id,
                resumed_at=utcnow(),
                after_round=int(last or 0),
                reason=reason,
                owner_host=owner.host,
                owner_pid=owner.pid,
            )
            _check_fits([row], self._shown)
            s.add(row)
            run.status, run.error, run.finished_at = RunStatus.RUNNING.value, None, None
            run.owner_host, run.owner_pid = owner.host, owner.pid
            return int(last or 0)

        return self._write(work)

    def resumptions(self, run_id: int) -> list[Resumption]:
        with self._transaction() as s:
            rows = s.scalars(
                select(RunResumeRow).where(RunResumeRow.run_id == run_id).order_by(RunResumeRow.id)
            ).all()
            return [
                Resumption(
                    r.resumed_at,
                    r.after_round,
                    r.reason,
                    None if r.owner_host is None else RunOwner(r.owner_host, int(r.owner_pid or 0)),
                )
                for r in rows
            ]

    def mark_interrupted(
        self,
        is_alive: Callable[[str, int], bool] = pid_alive,
        host: str | None = None,
    ) -> list[InterruptedRun]:
        here = host if host is not None else socket.gethostname()

        def work(s: Session) -> list[InterruptedRun]:
            running = s.scalars(
                select(RunRow)
                .where(RunRow.status == RunStatus.RUNNING.value, RunRow.owner_host == here)
                .where(RunRow.owner_pid.is_not(None))
                .order_by(RunRow.id)
            ).all()
            marked = []
            now = utcnow()
            for run in running:
                owner = RunOwner(here, int(run.owner_pid or 0))
                if is_alive(owner.host, owner.pid):
                    continue
                last = s.execute(
                    select(RoundRow.round, RoundRow.finished_at)
                    .where(RoundRow.run_id == run.id)
                    .order_by(RoundRow.round.desc())
                    .limit(1)
                ).first()
                if last is None:
                    recorded = "no round was recorded"
                else:
                    recorded = f"last recorded round {last[0]} (at {last[1]:%Y-%m-%d %H:%M:%S} UTC)"
                note = (
                    f"interrupted: process {owner.pid} on host {owner.host} was gone at "
                    f"{now:%Y-%m-%d %H:%M:%S} UTC; {recorded}"
                )
                # Only if still running: another process marking at the same time, or the
                # owner finishing after all, wins.
                done = cast(
                    "CursorResult[Any]",
                    s.execute(
                        update(RunRow)
                        .where(RunRow.id == run.id, RunRow.status == RunStatus.RUNNING.value)
                        .values(status=RunStatus.INTERRUPTED.value, error=note, finished_at=now)
                        .execution_options(synchronize_session=False)
                    ),
                )
                if done.rowcount == 1:
                    marked.append(InterruptedRun(run.id, owner, None if last is None else last[0]))
            return marked

        return self._write(work)

    def add_round(
        self, run_id: int, result: RoundResult, sites: list[SiteResult], state: bytes | None
    ) -> None:
        digest = None if state is None else hashlib.sha256(state).hexdigest()
        site_values = _site_values(run_id, sites)

        def rows() -> list[Base]:
            out: list[Base] = [
                RoundRow(
                    run_id=run_id,
                    round=result.round,
                    started_at=result.started_at,
                    finished_at=result.finished_at,
                    seconds=result.seconds,
                    pooled_auc=_finite(result.pooled_auc),
                    macro_auc=_finite(result.macro_auc),
                    loss=_finite(result.loss),
                    accepted=result.accepted,
                    rejected=result.rejected,
                    applied=int(result.applied),
                    val_loss=_finite(result.val_loss),
                    epsilon=_finite(result.epsilon),
                    sample_rate=_finite(result.sample_rate),
                    pooled_low=_finite(result.pooled_low),
                    pooled_high=_finite(result.pooled_high),
                    pooled_brier=_finite(result.pooled_brier),
                    pooled_ece=_finite(result.pooled_ece),
                    pooled_reliability=(
                        json.dumps([list(p) for p in result.pooled_reliability])
                        if result.pooled_reliability
                        else None
                    ),
                )
            ]
            if state is not None and digest is not None:
                out.append(
                    GlobalStateRow(run_id=run_id, round=result.round, sha256=digest, data=state)
                )
            return out

        _check_fits(rows() + [SiteResultRow(**v) for v in site_values], self._shown)

        def write(session: Session) -> None:  # the round, its sites and state: one commit
            session.add_all(rows())
            _insert_sites(session, site_values)

        self._write(write)

    def add_site_results(self, run_id: int, sites: list[SiteResult]) -> None:
        site_values = _site_values(run_id, sites)
        _check_fits([SiteResultRow(**v) for v in site_values], self._shown)
        self._write(lambda session: _insert_sites(session, site_values))

    def add_baselines(self, run_id: int, results: list[BaselineResult]) -> None:
        def rows() -> list[BaselineRow]:
            return [
                BaselineRow(
                    run_id=run_id,
                    kind=r.kind,
                    site=r.site,
                    n_train=r.n_train,
                    n_test=r.n_test,
                    auc=_finite(r.auc),
                    seconds=r.seconds,
                    degenerate=r.degenerate,
                    lr=r.lr,
                    diff=_finite(r.diff),
                    diff_se=_finite(r.diff_se),
                )
                for r in results
            ]

        _check_fits(rows(), self._shown)
        self._write(lambda s: s.add_all(rows()))

    def get_run(self, run_id: int | None = None) -> RunInfo:
        with self._transaction() as s:
            if run_id is None:
                row = s.scalars(select(RunRow).order_by(RunRow.id.desc()).limit(1)).first()
                if row is None:
                    raise StoreError(f"store {self._shown} holds no runs")
            else:
                row = s.get(RunRow, run_id)
                if row is None:
                    raise StoreError(f"store {self._shown} has no run {run_id}")
            return _run_info(row)

    def list_runs(self) -> list[RunInfo]:
        with self._transaction() as s:
            return [_run_info(r) for r in s.scalars(select(RunRow).order_by(RunRow.id))]

    def rounds(self, run_id: int) -> list[RoundResult]:
        with self._transaction() as s:
            rows = s.scalars(
                select(RoundRow).where(RoundRow.run_id == run_id).order_by(RoundRow.round)
            )
            return [
                _to(
                    RoundResult,
                    r,
                    applied=bool(r.applied),
                    pooled_reliability=tuple(
                        (float(m), float(o), int(k))
                        for m, o, k in json.loads(r.pooled_reliability or "[]")
                    ),
                )
                for r in rows
            ]

    def site_results(self, run_id: int) -> list[SiteResult]:
        with self._transaction() as s:
            rows = s.scalars(
                select(SiteResultRow)
                .where(SiteResultRow.run_id == run_id)
                .order_by(SiteResultRow.round, SiteResultRow.phase, SiteResultRow.site)
            )
            return [
                _to(
                    SiteResult,
                    r,
                    phase=Phase(r.phase),
                    status=ReplyStatus(r.status),
                    extra=dict(r.extra or {}),
                )
                for r in rows
            ]

    def baselines(self, run_id: int) -> list[BaselineResult]:
        with self._transaction() as s:
            rows = s.scalars(
                select(BaselineRow)
                .where(BaselineRow.run_id == run_id)
                .order_by(BaselineRow.kind, BaselineRow.site)
            )
            return [_to(BaselineResult, r, degenerate=bool(r.degenerate)) for r in rows]

    def global_state(self, run_id: int, round: int | None = None) -> tuple[int, bytes]:
        with self._transaction() as s:
            query = select(GlobalStateRow).where(GlobalStateRow.run_id == run_id)
            if round is not None:
                query = query.where(GlobalStateRow.round == round)
            row = s.scalars(query.order_by(GlobalStateRow.round.desc()).limit(1)).first()
            if row is None:
                raise StoreError(f"run {run_id} has no stored global state for round {round}")
            return row.round, row.data

    def close(self) -> None:
        self.engine.dispose()


def _sqlite_pragmas(busy_timeout: float, dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    # First: switching to WAL may itself wait for another connection's lock.
    cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout * 1000)}")
    # Readers go on while a round is written; a no-op ("memory") for an in-memory database.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.close()


def open_store(url: str, *, create: bool = True) -> RunStore:
    """Open the store at a SQLAlchemy URL, upgrading an older schema in place.

    ``create=True`` (a command that records runs) creates a missing store, a new SQLite file
    with mode 0600; ``create=False`` (a command that only reads) refuses a missing one with a
    ``StoreError`` naming it, and creates nothing.
    """
    return SqlRunStore(url, create=create)
