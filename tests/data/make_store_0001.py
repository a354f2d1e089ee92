"""Regenerate store-0001.db: a small store as revision 0001 of the schema wrote it.

    .venv/bin/python tests/data/make_store_0001.py

The schema comes from the repository's own migration, upgraded to "0001" and no further; the
rows are inserted with plain SQL against that schema (not through the store, whose models
follow the newest revision). tests/test_store.py opens a copy and checks that the upgrade to
head keeps every row. Run it only to change the rows: the committed file is the fixture.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine, text

from fedpeft.server.store.sql import MIGRATIONS

OUT = Path(__file__).with_name("store-0001.db")
T0 = "2026-11-27 10:00:00.000000"  # SQLAlchemy's SQLite DateTime format
T1 = "2026-11-27 10:01:30.500000"
STATE = b"sealed global state of round 1 (opaque to the store)"

ROWS = {
    "runs": [
        {
            "id": 1,
            "created_at": T0,
            "finished_at": T1,
            "status": "finished",
            "error": None,
            "config_json": json.dumps({"seed": 0, "method": {"name": "lora"}}),
            "dataset": "heart",
            "method": "lora",
            "model_name": "sentence-transformers/all-MiniLM-L6-v2",
            "model_fingerprint": "sha256:" + 64 * "0",
            "trainable_params": 74498,
            "total_params": 22787970,
            "seed": 0,
            "wall_seconds": 90.5,
        }
    ],
    "rounds": [
        {
            "id": 1,
            "run_id": 1,
            "round": 1,
            "started_at": T0,
            "finished_at": T1,
            "seconds": 90.5,
            "pooled_auc": 0.81,
            "macro_auc": 0.79,
            "loss": 0.52,
            "accepted": 1,
            "rejected": 1,
            "applied": 1,
        }
    ],
    "site_results": [
        {
            "id": 1,
            "run_id": 1,
            "round": 1,
            "site": "Cleveland",
            "phase": "train",
            "status": "ok",
            "reason": None,
            "n": 180,
            "loss": 0.48,
            "auc": 0.83,
            "auprc": 0.8,
            "accuracy": 0.77,
            "brier": 0.16,
            "bytes_up": 299815,
            "bytes_down": 300411,
            "seconds": 41.0,
            "extra": json.dumps({"steps": 36.0}),
        },
        {
            "id": 2,
            "run_id": 1,
            "round": 1,
            "site": "Hungary",
            "phase": "train",
            "status": "rejected",
            "reason": "non-finite: 1 tensor(s)",
            "n": None,
            "loss": None,
            "auc": None,
            "auprc": None,
            "accuracy": None,
            "brier": None,
            "bytes_up": 299815,
            "bytes_down": 300411,
            "seconds": None,
            "extra": json.dumps({}),
        },
    ],
    "global_states": [
        {
            "id": 1,
            "run_id": 1,
            "round": 1,
            "sha256": hashlib.sha256(STATE).hexdigest(),
            "data": STATE,
        }
    ],
    "baselines": [
        {
            "id": 1,
            "run_id": 1,
            "kind": "alone",
            "site": "Cleveland",
            "n_train": 180,
            "n_test": 61,
            "auc": 0.8,
            "seconds": 12.0,
        }
    ],
}


def main() -> None:
    OUT.unlink(missing_ok=True)
    engine = create_engine(f"sqlite:///{OUT}")
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "0001")
        for table, rows in ROWS.items():
            columns = list(rows[0])
            connection.execute(
                text(
                    f"INSERT INTO {table} ({', '.join(columns)}) "
                    f"VALUES ({', '.join(':' + c for c in columns)})"
                ),
                rows,
            )
    # Small pages: the fixture is a handful of rows, not 4 KB per table and index.
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.exec_driver_sql("PRAGMA page_size = 1024")
        connection.exec_driver_sql("VACUUM")
    engine.dispose()
    print(f"wrote {OUT} ({OUT.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
