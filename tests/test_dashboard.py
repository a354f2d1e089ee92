"""The dashboard's pages over a real store (SQLite file), served in process by Starlette's test
client: what each page shows against what the store holds, the live fragment of a running run,
the access token, and the command's refusals. The same pages in a real browser, over real
simulated runs, are tests/test_dashboard_browser.py."""

from __future__ import annotations

import json
import re
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from recorded_runs import TOKEN, add_round, record_runs
from starlette.testclient import TestClient

from fedpeft.cli import main
from fedpeft.common.config import RunConfig
from fedpeft.dashboard import create_app
from fedpeft.server.store import RunStore, open_store
from fedpeft.settings import is_loopback
from fedpeft.svgchart import Chart, Point, Series, render


@pytest.fixture
def store(tmp_path: Path) -> Iterator[RunStore]:
    s = open_store(f"sqlite:///{tmp_path / 'runs.db'}")
    record_runs(s)
    yield s
    s.close()


@pytest.fixture
def client(store: RunStore) -> TestClient:
    return TestClient(create_app(store))


def _cells(html: str, table_id: str, cls: str) -> list[str]:
    table = re.search(rf'<table id="{table_id}">(.*?)</table>', html, re.S)
    assert table, f"no table {table_id}"
    return [c.strip() for c in re.findall(rf'<td class="n {cls}"[^>]*>(.*?)</td>', table[1])]


def test_the_runs_page_lists_each_run_with_its_delivered_auc(client: TestClient) -> None:
    html = client.get("/").text
    rows = re.findall(r'<tr data-run="(\d+)">(.*?)</tr>', html, re.S)
    assert [r for r, _ in rows] == ["2", "1"]  # newest first
    running, finished = rows[0][1], rows[1][1]
    assert "running" in running and "1 / 5" in running
    assert "finished" in finished and "2 / 2" in finished
    # Run 1 delivers round 2 (its lowest validation loss): pooled AUC 0.78.
    assert re.search(r'class="n delivered">2<', finished)
    assert re.search(r'class="n auc">0.780<', finished)


def test_a_run_page_shows_the_stores_rounds_sites_bytes_and_rejections(
    client: TestClient, store: RunStore
) -> None:
    html = client.get("/runs/1").text
    rounds = store.rounds(1)
    assert _cells(html, "rounds", "pooled-auc") == [f"{r.pooled_auc:.3f}" for r in rounds]
    assert _cells(html, "rounds", "val-loss") == [f"{r.val_loss:.4f}" for r in rounds]
    assert '<th class="n">test loss</th>' in html  # RoundResult.loss: on the test rows
    assert 'id="delivered-round">2<' in html and 'id="delivered-auc">0.780<' in html
    # Each site's AUC at the delivered round, its interval and the baselines beside it.
    assert _cells(html, "sites", "federated") == ["0.800", "0.860"]
    assert _cells(html, "sites", "alone") == ["0.700", "0.760"]
    assert _cells(html, "sites", "centralized") == ["0.790", "0.830"]
    assert "[0.720, 0.870]" in html  # Cleveland's interval at round 2
    # Every site's AUC in every round.
    site_aucs = re.findall(r'<td class="n site-auc" data-site="([^"]+)">([\d.]+) ', html)
    assert site_aucs == [("Cleveland", "0.720"), ("Hungary", "0.810")] + [
        ("Cleveland", "0.800"),
        ("Hungary", "0.860"),
    ]
    # Bytes per site per round, as the store has them (a refused update was uploaded too).
    uploaded = {(r.round, r.site): r.bytes_up for r in store.site_results(1) if r.phase == "train"}
    shown = re.findall(r'<td class="n bytes" data-site="([^"]+)">([\d,]+)</td>', html)
    assert len(shown) == 4
    for (rnd, site), value in uploaded.items():
        assert (site, f"{value:,}") in shown, (rnd, site)
    # The rejection, with its reason; and the chart's points are the sites' AUCs per round.
    assert "update norm 91.2 above 50" in html
    points = re.findall(r'data-series="([^"]+)" data-x="(\d+)" data-y="([\d.]+)"', html)
    assert ("Cleveland", "1", "0.720000") in points and ("pooled", "2", "0.780000") in points
    # The alone and centralized macro AUCs are the reference lines.
    refs = dict(re.findall(r'data-label="([^"]+)" data-y="([\d.]+)"', html))
    assert refs == {"alone (macro)": "0.730000", "centralized (macro)": "0.810000"}


def test_a_run_page_shows_the_config_as_the_sites_received_it(
    client: TestClient, store: RunStore
) -> None:
    html = client.get("/runs/1").text
    block = re.search(r'<pre class="config" id="site-config">(.*?)</pre>', html, re.S)
    assert block
    shown = json.loads(block[1].replace("&#34;", '"').replace("&quot;", '"'))
    sites = json.loads(RunConfig.from_json(store.get_run(1).config_json).for_sites().to_json())
    assert shown == sites
    assert "tuning" not in shown  # the coordinator's own settings never reach the sites
    assert "secure aggregation" in html and "off: the coordinator opens each" in html


def test_a_running_runs_page_polls_and_its_live_part_gains_rounds(
    client: TestClient, store: RunStore
) -> None:
    page = client.get("/runs/2").text
    assert 'data-running="yes"' in page and "fetch(url" in page
    live = client.get("/runs/2/live").text
    assert 'data-live-running="yes"' in live
    assert re.findall(r'<tr data-round="(\d+)"', live.split('id="rounds"')[1])[:1] == ["1"]
    add_round(store, 2, 2, 0.71, {"Cleveland": 0.65, "Hungary": 0.77})
    live = client.get("/runs/2/live").text
    assert _cells(live, "rounds", "pooled-auc") == ["0.660", "0.710"]
    store.finish_run(2, status="finished", wall_seconds=10.0)
    assert 'data-live-running="no"' in client.get("/runs/2/live").text  # the page stops polling


def test_a_site_page_follows_the_site_across_runs(client: TestClient) -> None:
    html = client.get("/sites/Hungary").text
    rows = dict(re.findall(r'<tr data-run="(\d+)">(.*?)</tr>', html, re.S))
    assert set(rows) == {"1", "2"}
    assert re.search(r'class="n trained">1<', rows["1"])  # round 2's update was rejected
    assert re.search(r'class="n refused">1<', rows["1"])
    assert re.search(r'class="n auc">0.860<', rows["1"])
    assert re.search(r'class="n alone">0.760<', rows["1"])
    assert "update norm 91.2 above 50" in html


def test_two_runs_compared(client: TestClient) -> None:
    html = client.get("/compare?a=1&b=2").text
    assert re.search(r"<code>federation.rounds</code></td><td>2</td><td>5</td>", html)
    assert re.search(r"<code>train.lr</code></td><td>0.005</td><td>0.001</td>", html)
    site = re.search(r'<tr data-site="Cleveland">(.*?)</tr>', html, re.S)
    assert site and "0.800" in site[1] and "0.610" in site[1] and "-0.190" in site[1]
    assert client.get("/compare").status_code == 200  # the picker
    assert client.get("/compare?a=1&b=x").status_code == 400


def test_unknown_runs_and_sites_are_404_with_the_reason(client: TestClient) -> None:
    missing = client.get("/runs/99")
    assert missing.status_code == 404 and "99" in missing.text
    nowhere = client.get("/sites/Atlantis")
    assert nowhere.status_code == 404 and "Atlantis" in nowhere.text


def test_with_a_token_every_request_must_carry_it(store: RunStore) -> None:
    client = TestClient(create_app(store, token=TOKEN))
    assert client.get("/").status_code == 401
    assert client.get("/runs/1", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get("/runs/1", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    first = client.get(f"/?token={TOKEN}")
    assert first.status_code == 200
    assert client.get("/runs/1").status_code == 200  # the cookie it set carries the token


def test_is_loopback() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3")
    assert not is_loopback("dashboard.example.org")


def test_the_command_refuses_a_reachable_host_without_a_token(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FEDPEFT_DASHBOARD_TOKEN", raising=False)
    db = f"sqlite:///{tmp_path / 'x.db'}"
    assert main(["dashboard", "--db", db, "--host", "0.0.0.0"]) == 2
    assert "access token" in capsys.readouterr().err
    short = tmp_path / "token"
    short.write_text("abc\n")
    assert main(["dashboard", "--db", db, "--host", "0.0.0.0", "--token-file", str(short)]) == 2
    assert "shorter than 16" in capsys.readouterr().err
    assert main(["dashboard", "--db", db]) == 2  # a store that does not exist is not created
    assert "x.db" in capsys.readouterr().err and not (tmp_path / "x.db").exists()


def test_a_chart_spans_its_points_and_cuts_wide_intervals() -> None:
    chart = Chart(
        "AUC per round",
        [Series("Switzerland", [Point(1, 0.62, 0.27, 0.99), Point(2, 0.64, 0.30, 0.97)])],
        [("alone (macro)", 0.7)],
        y_range=(0.5, 1.0),
    )
    svg = render(chart)
    assert svg.count('class="point"') == 2 and 'data-y="0.620000"' in svg
    labels = [float(v) for v in re.findall(r'text-anchor="end">([\d.]+)<', svg)]
    assert min(labels) == 0.5 and max(labels) == 1.0  # not stretched to 0.27 by the interval
    empty = render(Chart("Loss per round", []))
    assert "nothing recorded yet" in empty and "<circle" not in empty
    # Close values get enough digits to tell the axis labels apart.
    close = render(Chart("loss", [Series("a", [Point(1, 0.6686), Point(2, 0.6680)])]))
    ticks = re.findall(r'text-anchor="end">([\d.]+)<', close)
    assert len(set(ticks)) == len(ticks) == 5


def test_a_run_of_many_sites_charts_each_faintly_under_one_legend_entry_and_the_median(
    tmp_path: Path,
) -> None:
    from recorded_runs import create

    store = open_store(f"sqlite:///{tmp_path / 'many.db'}")
    run = create(store, rounds=2, lr=5e-3)
    for rnd in (1, 2):
        aucs = {f"site-{i:02d}": 0.5 + 0.02 * i + 0.05 * rnd for i in range(14)}
        add_round(store, run, rnd, 0.8, aucs)
    html = TestClient(create_app(store)).get(f"/runs/{run}").text
    store.close()
    svg = re.search(r'<svg class="chart".*?</svg>', html, re.S)
    assert svg
    legend = re.findall(r'font-size="11">([^<]+)</text>', svg[0])
    assert "each of 14 sites" in legend and "median site" in legend
    assert not any(label.startswith("site-") for label in legend)
    # Every site's points stay in the chart, with their values.
    points = re.findall(r'data-series="(site-\d+)" data-x="(\d)" data-y="([\d.]+)"', svg[0])
    assert len(points) == 28
    median = re.findall(r'data-series="median site" data-x="(\d)" data-y="([\d.]+)"', svg[0])
    assert [(x, round(float(y), 3)) for x, y in median] == [("1", 0.68), ("2", 0.73)]


def test_a_port_in_use_is_a_clear_error(
    store: RunStore, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        db = f"sqlite:///{tmp_path / 'runs.db'}"
        assert main(["dashboard", "--db", db, "--port", str(port)]) == 2
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err


class _NoStates:
    """The store as the dashboard gets it, with the one way to a global state closed."""

    def __init__(self, store: RunStore) -> None:
        self._store = store

    def __getattr__(self, name: str) -> object:
        if name == "global_state":
            raise AssertionError("the dashboard read a global state")
        return getattr(self._store, name)


def test_no_page_reads_a_global_state(store: RunStore) -> None:
    """What the docs claim: the dashboard holds no store key and opens no state."""
    client = TestClient(create_app(_NoStates(store)))  # type: ignore[arg-type]
    pages = ["/", "/runs/1", "/runs/2/live", "/runs/1/card", "/sites/Hungary", "/compare?a=1&b=2"]
    for page in pages:
        assert client.get(page).status_code == 200, page
