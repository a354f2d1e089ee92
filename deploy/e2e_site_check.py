"""Run by deploy/e2e-compose.sh inside each hospital's container of the rehearsal, after
`docker compose up`: the site's ledger (on its own state volume) must verify as an unbroken
hash chain, record a task and a sealed upload for the train message of every round (hashes and
sizes only), and hold no refusal. Exit status 0 only if all of that holds."""

import os
import sys
from pathlib import Path

from fedpeft.client.ledger import Ledger
from fedpeft.settings import load_site_config

ROUNDS = int(os.environ.get("FEDPEFT_ROUNDS", "2"))
site = load_site_config(Path("/site/site.toml"))
ledger = Ledger(site.ledger)
problems = []

result = ledger.verify()
if not result.ok:
    problems.append(f"{site.ledger}: {result.message}")
else:
    entries = [r.entry for r in ledger.entries()]
    uploads = [e for e in entries if e.event == "upload" and e.message_type == "train"]
    if sorted(e.round for e in uploads) != list(range(1, ROUNDS + 1)):
        got = [e.round for e in uploads]
        problems.append(f"train uploads for rounds {got}, expected 1..{ROUNDS}")
    if any(len(e.upload_sha256) != 64 or e.upload_bytes <= 0 for e in uploads):
        problems.append("a train upload without the hash and size of what left")
    tasks = [e for e in entries if e.event == "task" and e.message_type == "train"]
    if len(tasks) != ROUNDS:
        problems.append(f"{len(tasks)} train tasks recorded, expected {ROUNDS}")
    refused = [e.reason for e in entries if e.event == "refused"]
    if refused:
        problems.append(f"refusals recorded: {refused}")
    print(f"{site.name}: {result.message}; {len(uploads)} train uploads, {len(entries)} entries")

for p in problems:
    print(f"E2E SITE CHECK FAILED ({site.name}): {p}", file=sys.stderr)
sys.exit(1 if problems else 0)
