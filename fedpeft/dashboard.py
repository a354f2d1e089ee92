"""``fedpeft dashboard``: a read-only web view of the store (Starlette + Jinja2, served by
uvicorn). Pages: the runs; one run (its config as the sites saw it, the rounds, AUC per round
per site with intervals and the baselines' reference lines, bytes per site per round, every
rejection and refusal, privacy settings, the delivered round); one site across runs; two runs
compared. A running run's page fetches its changing part again every few seconds, so rounds
appear as they land. Charts are inline SVG drawn here (fedpeft/svgchart.py); the pages load
nothing from anywhere else.

The views (``runs_view`` ...) read the store and return plain data; the templates only lay it
out, so a test can compare a page with the view and the view with the store.
"""

from __future__ import annotations

import hmac
import json
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from jinja2 import Environment, PackageLoader, select_autoescape
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, Response
from starlette.routing import Route

from fedpeft.card import flatten, site_config_json
from fedpeft.common.errors import StoreError
from fedpeft.common.keys import AUC_HIGH, AUC_LOW, SITE_EPSILON, Phase
from fedpeft.report import Summary, median_by_round, summarize
from fedpeft.server.rounds import LISTED_SITES, delivered_round
from fedpeft.server.store import (
    ALL_TEST_ROWS,
    RoundResult,
    RunInfo,
    RunStatus,
    RunStore,
    SiteResult,
)
from fedpeft.svgchart import Chart, Point, Series, render

#: Seconds between a running run's page fetching its rounds again.
REFRESH_SECONDS = 2.0
TOKEN_COOKIE = "fedpeft_dashboard"


# --- views: the store's records, shaped for a page ---------------------------------------------


@dataclass(frozen=True)
class RunRow:
    info: RunInfo
    status: str  # the run's status, "interrupted after round 3" and the like
    rounds: int  # rounds recorded
    planned: int | None  # federation.rounds of its config
    delivered: int | None
    pooled_auc: float | None  # the delivered round's


@dataclass(frozen=True)
class ProblemRow:
    round: int
    phase: str
    site: str
    status: str
    reason: str


@dataclass
class RunView:
    row: RunRow
    summary: Summary
    site_config: str  # the config as the sites received it (pretty JSON)
    privacy: list[tuple[str, str]]
    rounds: list[RoundResult]
    auc_chart: str
    loss_chart: str
    sites: list[str]
    #: (round, site) -> (bytes up, bytes down) of the site's train reply in that round.
    traffic: dict[tuple[int, str], tuple[int, int]]
    problems: list[ProblemRow]
    #: (round, site) -> the site's AUC that round, with its interval's ends.
    site_aucs: dict[tuple[int, str], tuple[float, float | None, float | None]]
    running: bool
    refresh_seconds: float = REFRESH_SECONDS


@dataclass
class SiteRunRow:
    run: RunRow
    trained: int  # rounds whose train reply was used
    evaluated: int
    refused: int  # replies rejected or failed
    auc: float | None  # at the run's delivered round
    auc_low: float | None
    auc_high: float | None
    alone: float | None
    epsilon: float | None


@dataclass
class SiteView:
    site: str
    runs: list[SiteRunRow]
    problems: list[tuple[int, ProblemRow]]  # (run, problem)
    chart: str


@dataclass
class CompareView:
    a: RunView
    b: RunView
    sites: list[str]
    #: Config keys (dotted) whose values differ: (key, a's value, b's value).
    config_diff: list[tuple[str, str, str]] = field(default_factory=list)


def _planned_rounds(info: RunInfo) -> int | None:
    try:
        value = json.loads(info.config_json)["federation"]["rounds"]
    except (ValueError, KeyError, TypeError):
        return None
    return value if isinstance(value, int) else None


def run_row(info: RunInfo, rounds: list[RoundResult]) -> RunRow:
    """A run's line: ``rounds`` are its recorded rounds (the caller has read them)."""
    delivered = delivered_round(rounds)
    status = info.status
    if status == RunStatus.INTERRUPTED:
        last = max((r.round for r in rounds), default=None)
        status += " before round 1" if last is None else f" after round {last}"
    return RunRow(
        info=info,
        status=status,
        rounds=len(rounds),
        planned=_planned_rounds(info),
        delivered=delivered.round if delivered else None,
        pooled_auc=delivered.pooled_auc if delivered else None,
    )


def runs_view(store: RunStore) -> list[RunRow]:
    """Every run, newest first."""
    runs = sorted(store.list_runs(), key=lambda r: -r.id)
    return [run_row(info, store.rounds(info.id)) for info in runs]


def _site_config(info: RunInfo) -> str:
    """The run's config as its sites received it; the stored config when it cannot be read as
    one (a run recorded by an older version)."""
    text = site_config_json(info.config_json) or info.config_json
    return json.dumps(json.loads(text), indent=2, sort_keys=True)


def _privacy(info: RunInfo, rounds: list[RoundResult]) -> list[tuple[str, str]]:
    try:
        fed = json.loads(info.config_json)["federation"]
    except (ValueError, KeyError, TypeError):
        return [("settings", "not recorded")]
    secagg, dp = fed.get("secure_aggregation", {}), fed.get("dp", {})
    out = [
        ("sealed uploads", "every delta is encrypted for the coordinator and signed by its site"),
        ("score histogram bins", str(fed.get("histogram_bins", "—"))),
    ]
    if secagg.get("enabled"):
        out.append(
            (
                "secure aggregation",
                f"on: the coordinator sees only the sum of the updates and of the score "
                f"histograms, not each site's (threshold "
                f"{secagg.get('threshold', '—')}, clip {secagg.get('clip', '—')})",
            )
        )
    else:
        out.append(("secure aggregation", "off: the coordinator opens each site's delta"))
    if dp.get("enabled"):
        spent = [r.epsilon for r in rounds if r.epsilon is not None]
        out.append(
            (
                "differential privacy",
                f"{dp.get('mode', 'central')}: clip {dp.get('clip')}, noise multiplier "
                f"{dp.get('noise_multiplier')}, budget ε {dp.get('epsilon') or 'none'}, "
                f"δ {dp.get('delta')}",
            )
        )
        out.append(("ε spent", f"{spent[-1]:.3f}" if spent else "none yet"))
    else:
        out.append(("differential privacy", "off"))
    return out


def _auc_chart(
    rounds: list[RoundResult], results: list[SiteResult], summary: Summary
) -> tuple[str, dict[tuple[int, str], tuple[float, float | None, float | None]]]:
    per_site: dict[str, list[Point]] = {}
    aucs: dict[tuple[int, str], tuple[float, float | None, float | None]] = {}
    for r in sorted(results, key=lambda r: (r.site, r.round)):
        if r.phase != Phase.EVALUATE or r.status != "ok" or r.auc is None:
            continue
        if not math.isfinite(r.auc):
            continue
        low, high = r.extra.get(AUC_LOW), r.extra.get(AUC_HIGH)
        per_site.setdefault(r.site, []).append(Point(r.round, r.auc, low, high))
        aucs[(r.round, r.site)] = (r.auc, low, high)
    many = len(per_site) > LISTED_SITES  # one faint line each, and the median site
    series = [Series(site, pts, faint=many) for site, pts in sorted(per_site.items())]
    if many:
        median = median_by_round((rnd, auc) for (rnd, _), (auc, _, _) in aucs.items())
        series.append(Series("median site", [Point(rnd, auc) for rnd, auc in median]))
    pooled = [
        Point(r.round, r.pooled_auc, r.pooled_low, r.pooled_high)
        for r in rounds
        if r.pooled_auc is not None
    ]
    if pooled:
        series.append(Series("pooled", pooled, dashed=True))
    references = [
        (f"{kind} (macro)", value)
        for kind, attr in (("alone", "alone"), ("centralized", "centralized"))
        if (value := summary.macro(attr)) is not None
    ]
    chart = Chart("AUC per round", series, references, y_range=(0.5, 1.0))
    return render(chart), aucs


def _loss_chart(rounds: list[RoundResult]) -> str:
    series = [
        Series(name, [Point(r.round, v) for r in rounds if (v := get(r)) is not None])
        for name, get in (
            ("test loss", lambda r: r.loss),  # the round's global state on the test rows
            ("validation loss", lambda r: r.val_loss),
        )
    ]
    return render(Chart("Loss per round", [s for s in series if s.points]))


def _problems(results: list[SiteResult]) -> list[ProblemRow]:
    return [
        ProblemRow(r.round, str(r.phase), r.site, str(r.status), r.reason or "")
        for r in sorted(results, key=lambda r: (r.round, r.phase, r.site))
        if r.status != "ok"
    ]


def run_view(store: RunStore, run_id: int) -> RunView:
    info = store.get_run(run_id)
    rounds = sorted(store.rounds(run_id), key=lambda r: r.round)
    results = store.site_results(run_id)
    summary = summarize(store, run_id)
    auc_chart, site_aucs = _auc_chart(rounds, results, summary)
    return RunView(
        row=run_row(info, rounds),
        summary=summary,
        site_config=_site_config(info),
        privacy=_privacy(info, rounds),
        rounds=rounds,
        auc_chart=auc_chart,
        loss_chart=_loss_chart(rounds),
        sites=sorted({r.site for r in results} - {ALL_TEST_ROWS}),
        traffic={
            (r.round, r.site): (r.bytes_up, r.bytes_down) for r in results if r.phase == Phase.TRAIN
        },
        problems=_problems(results),
        site_aucs=site_aucs,
        running=info.status == RunStatus.RUNNING,
    )


def site_view(store: RunStore, site: str) -> SiteView:
    rows: list[SiteRunRow] = []
    problems: list[tuple[int, ProblemRow]] = []
    for info in sorted(store.list_runs(), key=lambda r: r.id):
        results = [r for r in store.site_results(info.id) if r.site == site]
        baselines = {b.kind: b for b in store.baselines(info.id) if b.site == site}
        if not results and not baselines:
            continue
        row = run_row(info, store.rounds(info.id))
        ev = next(
            (
                r
                for r in results
                if r.phase == Phase.EVALUATE and r.round == row.delivered and r.status == "ok"
            ),
            None,
        )
        trains = sorted((r for r in results if r.phase == Phase.TRAIN), key=lambda r: r.round)
        epsilons = [r.extra[SITE_EPSILON] for r in trains if SITE_EPSILON in r.extra]
        alone = baselines.get("alone")
        rows.append(
            SiteRunRow(
                run=row,
                trained=sum(1 for r in trains if r.status == "ok"),
                evaluated=sum(1 for r in results if r.phase == Phase.EVALUATE and r.status == "ok"),
                refused=sum(1 for r in results if r.status != "ok"),
                auc=ev.auc if ev else None,
                auc_low=ev.extra.get(AUC_LOW) if ev else None,
                auc_high=ev.extra.get(AUC_HIGH) if ev else None,
                alone=alone.auc if alone else None,
                epsilon=epsilons[-1] if epsilons else None,
            )
        )
        problems += [(info.id, p) for p in _problems(results)]
    if not rows:
        raise StoreError(f"no run in the store has a site named {site!r}")
    chart = Chart(
        f"{site}: AUC at each run's delivered round",
        [
            Series(
                "federated",
                [Point(r.run.info.id, r.auc, r.auc_low, r.auc_high) for r in rows if r.auc],
            ),
            Series("alone", [Point(r.run.info.id, r.alone) for r in rows if r.alone], dashed=True),
        ],
        x_label="run",
        y_range=(0.5, 1.0),
    )
    return SiteView(site, rows, problems, render(chart))


def compare_view(store: RunStore, a: int, b: int) -> CompareView:
    va, vb = run_view(store, a), run_view(store, b)
    fa = {k: json.dumps(v) for k, v in flatten(json.loads(va.row.info.config_json))}
    fb = {k: json.dumps(v) for k, v in flatten(json.loads(vb.row.info.config_json))}
    diff = [
        (key, fa.get(key, "—"), fb.get(key, "—"))
        for key in sorted(fa.keys() | fb.keys())
        if fa.get(key) != fb.get(key) and key not in ("db",)
    ]
    sites = sorted({r.site for r in va.summary.rows} | {r.site for r in vb.summary.rows})
    return CompareView(va, vb, sites, diff)


# --- the web app -------------------------------------------------------------------------------


def _number(value: float | None, digits: int = 3) -> str:
    if value is None or not math.isfinite(value):
        return "—"
    return f"{value:.{digits}f}"


def _interval(low: float | None, high: float | None) -> str:
    if low is None or high is None or not (math.isfinite(low) and math.isfinite(high)):
        return ""
    return f"[{low:.3f}, {high:.3f}]"


def _environment() -> Environment:
    env = Environment(
        loader=PackageLoader("fedpeft", "templates"),
        autoescape=select_autoescape(["html"]),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["num"] = _number
    env.filters["interval"] = _interval
    env.filters["thousands"] = lambda n: "—" if n is None else f"{n:,}"
    return env


def render_card(card: dict) -> str:
    """A model card (fedpeft/card.py ``build_card``) as one HTML page."""
    return _environment().get_template("card.html").render(card=card)


def _token_of(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        return header[7:].strip()
    return request.query_params.get("token") or request.cookies.get(TOKEN_COOKIE)


def create_app(store: RunStore, *, token: str | None = None) -> Starlette:
    """The dashboard over an open store. With ``token``, every request must carry it: as
    ``Authorization: Bearer``, as ``?token=`` (which sets a cookie, so links work) or in that
    cookie; others get 401."""
    env = _environment()

    def page(name: str, status: int = 200, **context: Any) -> HTMLResponse:
        return HTMLResponse(env.get_template(name).render(**context), status_code=status)

    def not_found(message: str) -> HTMLResponse:
        return page("error.html", 404, message=message)

    def runs(request: Request) -> Response:
        return page("runs.html", runs=runs_view(store))

    def run_page(template: str) -> Callable[[Request], Response]:
        def endpoint(request: Request) -> Response:
            try:
                view = run_view(store, int(request.path_params["run_id"]))
            except StoreError as exc:
                return not_found(str(exc))
            return page(template, v=view)

        return endpoint

    def card(request: Request) -> Response:
        from fedpeft.card import build_card

        try:
            data = build_card(store, int(request.path_params["run_id"]))
        except StoreError as exc:
            return not_found(str(exc))
        return page("card.html", card=data)

    def site(request: Request) -> Response:
        try:
            view = site_view(store, request.path_params["site"])
        except StoreError as exc:
            return not_found(str(exc))
        return page("site.html", v=view)

    def compare(request: Request) -> Response:
        try:
            a, b = int(request.query_params["a"]), int(request.query_params["b"])
        except (KeyError, ValueError):
            return page(
                "compare_pick.html",
                400 if request.query_params else 200,
                runs=runs_view(store),
            )
        try:
            view = compare_view(store, a, b)
        except StoreError as exc:
            return not_found(str(exc))
        return page("compare.html", v=view)

    async def require_token(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        given = _token_of(request)
        if given is None or not hmac.compare_digest(given.encode(), (token or "").encode()):
            return PlainTextResponse(
                "401: this dashboard needs its access token (?token=... or "
                "Authorization: Bearer ...)",
                status_code=401,
            )
        response = await call_next(request)
        if request.query_params.get("token"):
            response.set_cookie(TOKEN_COOKIE, given, httponly=True, samesite="strict")
        return response

    return Starlette(
        routes=[
            Route("/", runs),
            Route("/runs/{run_id:int}", run_page("run.html")),
            # The changing part of a run's page, which a running run's page fetches again.
            Route("/runs/{run_id:int}/live", run_page("run_live.html")),
            Route("/runs/{run_id:int}/card", card),
            Route("/sites/{site:str}", site),
            Route("/compare", compare),
        ],
        middleware=[Middleware(BaseHTTPMiddleware, dispatch=require_token)] if token else [],
    )
