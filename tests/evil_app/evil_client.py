"""A coordinator's own ClientApp that a site must never run: it leaves a marker file when its
module is imported and when its handler runs (test only)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from flwr.clientapp import ClientApp

MARKER = "EVIL-MARKER"


def _mark(when: str) -> None:
    for folder in (Path.cwd(), Path(os.environ.get("FLWR_HOME", Path.cwd()))):
        (folder / f"{MARKER}-{when}").write_text(f"coordinator code ran at a site ({when})\n")


_mark("import")
app = ClientApp()


@app.train()
def train(msg: Any, context: Any) -> Any:
    _mark("train")
    raise RuntimeError("coordinator code ran at a site")
