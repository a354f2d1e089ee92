"""Run by deploy/e2e-compose.sh inside a container of the rehearsal, after `docker compose up`:
the coordinator's store must hold one finished run with every round applied and an AUC for
every site in every round; and this container must have no route and no name resolution
beyond the compose network that the host lets through. Exit status 0 only if all of that holds."""

import os
import socket
import sys

from fedpeft.server.store import open_store

SITES = {"Cleveland", "Hungary", "VA-Long-Beach"}
ROUNDS = int(os.environ.get("FEDPEFT_ROUNDS", "2"))
problems = []

store = open_store("sqlite:////coordinator/runs.db", create=False)
runs = store.list_runs()
if len(runs) != 1 or runs[0].status != "finished":
    problems.append(f"expected one finished run, found {[(r.id, r.status, r.error) for r in runs]}")
else:
    run = runs[0]
    rounds = store.rounds(run.id)
    if [r.round for r in rounds] != list(range(1, ROUNDS + 1)):
        problems.append(f"rounds in the store: {[r.round for r in rounds]}, expected 1..{ROUNDS}")
    for r in rounds:
        if not r.applied or r.accepted != len(SITES):
            problems.append(f"round {r.round}: applied={r.applied}, accepted={r.accepted}")
    evals = [r for r in store.site_results(run.id) if r.phase == "evaluate"]
    for rnd in range(1, ROUNDS + 1):
        got = {r.site: r.auc for r in evals if r.round == rnd and r.status == "ok"}
        if set(got) != SITES or any(auc is None for auc in got.values()):
            problems.append(f"round {rnd}: per-site AUC {got}")
        else:
            print(f"round {rnd}: " + ", ".join(f"{s} AUC {got[s]:.3f}" for s in sorted(got)))
    # Each deployed site states its data fingerprint beside its updates (the model card's
    # lineage), the same every round.
    trains = [r for r in store.site_results(run.id) if r.phase == "train"]
    stated = {r.site: {r.data_fingerprint} for r in trains}
    for r in trains:
        stated[r.site].add(r.data_fingerprint)
    if set(stated) != SITES or any(len(v) != 1 or None in v for v in stated.values()):
        problems.append(f"data fingerprints per site: {stated}")
    else:
        print("lineage: every site stated one data fingerprint")
store.close()

# Docker gives even an internal network a default route via the host's bridge address, and
# with --iptables=false the host would forward: e2e-compose.sh's firewall rules must drop it.
# The gateway is the host itself (no listener there): a refusal would mean packets get through,
# a timeout means they are dropped. Nothing outside the machine is dialled.
with open("/proc/net/route") as routes:
    table = [line.split() for line in routes.read().splitlines()[1:]]
gateways = {socket.inet_ntoa(bytes.fromhex(f[2])[::-1]) for f in table if f[1] == "00000000"}
for gateway in sorted(gateways):
    try:
        socket.create_connection((gateway, 9), timeout=3).close()
        problems.append(f"the host at {gateway} accepts connections from the compose network")
    except TimeoutError:
        print(f"isolation: packets to the gateway {gateway} are dropped")
    except OSError as exc:
        problems.append(f"the host at {gateway} answers the compose network ({exc})")
# No name outside the network resolves (the resolver behind the embedded DNS is not there).
try:
    socket.getaddrinfo("deb.debian.org", 443)
    problems.append("deb.debian.org resolves inside the compose network")
except socket.gaierror:
    print("isolation: names outside the compose network do not resolve")

for p in problems:
    print(f"e2e check: {p}", file=sys.stderr)
sys.exit(1 if problems else 0)
