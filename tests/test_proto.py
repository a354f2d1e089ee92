"""The committed protobuf code is exactly what tools/genproto makes from proto/ today."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _files(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    }


def test_generated_code_matches_a_fresh_run(tmp_path: Path) -> None:
    out = tmp_path / "_proto"
    subprocess.run(
        [str(ROOT / "tools" / "genproto"), str(out)],
        check=True,
        env={**os.environ, "PYTHON": sys.executable},
        cwd=ROOT,
    )
    fresh, committed = _files(out), _files(ROOT / "common" / "_proto")
    assert sorted(fresh) == sorted(committed), "run tools/genproto and commit common/_proto"
    for name, data in fresh.items():
        assert committed[name] == data, f"{name} drifted: run tools/genproto and commit it"


def test_every_message_of_the_proto_is_generated() -> None:
    from fedpeft.common._proto.fedpeft.v1 import envelope_pb2 as pb

    source = (ROOT / "proto" / "fedpeft" / "v1" / "envelope.proto").read_text()
    declared = {line.split()[1] for line in source.splitlines() if line.startswith("message ")}
    assert declared == set(pb.DESCRIPTOR.message_types_by_name)
