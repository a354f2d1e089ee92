"""SQLAlchemy implementation of :class:`RunStore`: SQLite file by default, any URL works.

The schema is created and upgraded by Alembic migrations (``migrations/``), never by
``create_all``: a store opened on an older database is upgraded in place.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import create_engine, event, select
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import StaticPool

from fedpeft.common.errors import StoreError
from fedpeft.common.keys import Phase
from fedpeft.server.store.base import (
    BaselineResult,
    ReplyStatus,
    RoundResult,
    RunInfo,
    RunStore,
    SiteResult,
    utcnow,
)
from fedpeft.server.store.models import (
    BaselineRow,
    GlobalStateRow,
    RoundRow,
    RunRow,
    SiteResultRow,
)

T = TypeVar("T")
MIGRATIONS = Path(__file__).parent / "migrations"


def _finite(value: float | None) -> float | None:
    # NaN means "undefined" (e.g. AUC of a single-class set); databases disagree on NaN, so
    # the store keeps it as NULL.
    return None if value is None or not math.isfinite(value) else float(value)


def _to(cls: type[T], row: Any, **extra: Any) -> T:
    values = {f.name: getattr(row, f.name) for f in fields(cls) if f.name not in extra}  # type: ignore[arg-type]
    return cls(**values, **extra)


def _safe_url(url: str) -> str:
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<unparseable URL>"


def upgrade_schema(engine: Engine) -> None:
    """Bring the database to the newest schema with Alembic."""
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "head")


class SqlRunStore(RunStore):
    """A run store in any SQLAlchemy database."""

    def __init__(self, url: str):
        self.url = url
        try:
            if url in ("sqlite://", "sqlite:///:memory:"):
                engine = create_engine(
                    url, poolclass=StaticPool, connect_args={"check_same_thread": False}
                )
            else:
                engine = create_engine(url, pool_pre_ping=True)
        except (ArgumentError, ImportError) as exc:
            raise StoreError(f"cannot use store URL {_safe_url(url)}: {exc}") from None
        if engine.dialect.name == "sqlite":
            event.listen(engine, "connect", _sqlite_pragmas)
        self.engine = engine
        self._sessions = sessionmaker(engine, expire_on_commit=False)
        try:
            upgrade_schema(engine)
        except SQLAlchemyError as exc:
            cause = getattr(exc, "orig", None) or exc
            raise StoreError(
                f"cannot open store {_safe_url(url)}: {exc.__class__.__name__}: {cause}"
            ) from None

    @contextmanager
    def _transaction(self) -> Iterator[Session]:
        """The one transaction boundary: commit on success, roll back and wrap on error."""
        session = self._sessions()
        try:
            yield session
            session.commit()
        except SQLAlchemyError as exc:
            session.rollback()
            raise StoreError(f"store {_safe_url(self.url)}: {exc.__class__.__name__}") from exc
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()

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
    ) -> int:
        row = RunRow(
            created_at=utcnow(),
            status="running",
            config_json=config_json,
            dataset=dataset,
            method=method,
            model_name=model_name,
            model_fingerprint=model_fingerprint,
            trainable_params=trainable_params,
            total_params=total_params,
            seed=seed,
        )
        with self._transaction() as s:
            s.add(row)
            s.flush()
            return row.id

    def finish_run(
        self, run_id: int, *, status: str, error: str | None = None, wall_seconds: float | None
    ) -> None:
        with self._transaction() as s:
            row = s.get(RunRow, run_id)
            if row is None:
                raise StoreError(f"no run {run_id}")
            row.status, row.error, row.finished_at = status, error, utcnow()
            row.wall_seconds = wall_seconds

    def add_round(
        self, run_id: int, result: RoundResult, sites: list[SiteResult], state: bytes | None
    ) -> None:
        with self._transaction() as s:
            s.add(
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
                )
            )
            for site in sites:
                values = {f.name: getattr(site, f.name) for f in fields(SiteResult)}
                for key in ("loss", "auc", "auprc", "accuracy", "brier", "seconds"):
                    values[key] = _finite(values[key])
                values["extra"] = {k: _finite(v) for k, v in site.extra.items()}
                # The enums' plain values: every database driver takes a str.
                values["phase"], values["status"] = str(site.phase), str(site.status)
                s.add(SiteResultRow(run_id=run_id, **values))
            if state is not None:
                s.add(
                    GlobalStateRow(
                        run_id=run_id,
                        round=result.round,
                        sha256=hashlib.sha256(state).hexdigest(),
                        data=state,
                    )
                )

    def add_baselines(self, run_id: int, results: list[BaselineResult]) -> None:
        with self._transaction() as s:
            for r in results:
                s.add(
                    BaselineRow(
                        run_id=run_id,
                        kind=r.kind,
                        site=r.site,
                        n_train=r.n_train,
                        n_test=r.n_test,
                        auc=_finite(r.auc),
                        seconds=r.seconds,
                    )
                )

    def get_run(self, run_id: int | None = None) -> RunInfo:
        with self._transaction() as s:
            if run_id is None:
                row = s.scalars(select(RunRow).order_by(RunRow.id.desc()).limit(1)).first()
                if row is None:
                    raise StoreError(f"store {_safe_url(self.url)} holds no runs")
            else:
                row = s.get(RunRow, run_id)
                if row is None:
                    raise StoreError(f"store {_safe_url(self.url)} has no run {run_id}")
            return _to(RunInfo, row)

    def list_runs(self) -> list[RunInfo]:
        with self._transaction() as s:
            return [_to(RunInfo, r) for r in s.scalars(select(RunRow).order_by(RunRow.id))]

    def rounds(self, run_id: int) -> list[RoundResult]:
        with self._transaction() as s:
            rows = s.scalars(
                select(RoundRow).where(RoundRow.run_id == run_id).order_by(RoundRow.round)
            )
            return [_to(RoundResult, r, applied=bool(r.applied)) for r in rows]

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
            return [_to(BaselineResult, r) for r in rows]

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


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def open_store(url: str) -> RunStore:
    """Open (creating or upgrading) the store at a SQLAlchemy URL."""
    return SqlRunStore(url)
