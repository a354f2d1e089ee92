"""``fedpeft export``: a run's global state from the store, opened with the store key, written
for the ecosystem's loaders (common/export.py) with the model card as README.md."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from fedpeft.card import build_card, to_markdown
from fedpeft.common.config import RunConfig
from fedpeft.common.errors import FedpeftError
from fedpeft.common.export import export_state
from fedpeft.common.tensors import to_torch
from fedpeft.server.checkpoints import open_state, resolve_store_key
from fedpeft.server.rounds import select_round
from fedpeft.server.store import open_store


def export_run(
    db: str,
    out: Path,
    *,
    run_id: int | None = None,
    round: int | None = None,
    store_key_file: Path | None = None,
    warn: Callable[[str], None] = print,
    quantize: str = "none",
) -> tuple[int, int, list[Path]]:
    """Export run ``run_id`` (default: the latest) of store ``db`` at ``round`` (default: its
    delivered round) into ``out``, a new or empty folder; return (run, round, files)."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FedpeftError(f"{out}: exists and is not an empty folder; choose a new --out")
    store = open_store(db, create=False)  # first: a mistyped --db names the store
    try:
        store_key, _ = resolve_store_key(db, store_key_file)
        run = store.get_run(run_id)
        chosen = round if round is not None else select_round(store.rounds(run.id))
        if chosen is None:
            raise FedpeftError(f"run {run.id} has no stored round to export")
        if run.status != "finished":
            warn(f"warning: run {run.id} is {run.status}; exporting its round {chosen}")
        round_, data = store.global_state(run.id, chosen)
        model_card = build_card(store, run.id, round_)
    finally:
        store.close()
    files = export_state(
        RunConfig.from_json(run.config_json),
        to_torch(open_state(store_key, run.id, round_, data)),
        out,
        run_id=run.id,
        round=round_,
        fingerprint=run.model_fingerprint,
        quantize=quantize,
    )
    readme = out / "README.md"  # in place of the blank card peft writes
    readme.write_text(to_markdown(model_card))
    return run.id, round_, [*files, readme]
