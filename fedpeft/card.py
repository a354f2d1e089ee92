"""A run's model card with its lineage, from the store: what `fedpeft export` writes as the
export's README.md (Hugging Face model-card format: YAML metadata, then Markdown) and what
`fedpeft report --format json|md|html` prints.

One structure (:func:`build_card`, plain JSON data) and three renderings, so the three say the
same. Lineage: the base model and its fingerprint, the run and the round described, the site
config's SHA-256 (the name a site's ledger and approvals give the run), the sites whose updates
made each round and those refused, each site's data fingerprint as the site stated it beside
its updates (a hash of its rows computed at the site: common/data.py ``data_fingerprint``).
"""

from __future__ import annotations

import json
import math
import platform
import re
from collections.abc import Iterator, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

from fedpeft.common.config import RunConfig
from fedpeft.common.errors import FedpeftError
from fedpeft.common.keys import AUC_HIGH, AUC_LOW, Phase
from fedpeft.common.manifest import config_hash
from fedpeft.common.model import DEFAULT_MODEL_HUB_ID, DEFAULT_MODEL_NAME
from fedpeft.report import summarize
from fedpeft.server.rounds import delivered_round
from fedpeft.server.store import RunStore

#: The packages whose versions the card names (those of the environment writing it).
PACKAGES = ("fedpeft", "torch", "transformers", "peft", "flwr", "safetensors")


def _num(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else round(float(x), 6)


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def hub_id(model_name: str) -> str | None:
    """The Hugging Face id of a run's base model, for the card's ``base_model``: the packaged
    default is a copy of sentence-transformers/all-MiniLM-L6-v2; another name is one when it is
    ``owner/name`` and no local folder. None: a local model with no id to give."""
    if model_name == DEFAULT_MODEL_NAME:
        return DEFAULT_MODEL_HUB_ID
    looks_like_id = re.fullmatch(r"[\w.-]+/[\w.-]+", model_name) is not None
    return model_name if looks_like_id and not Path(model_name).exists() else None


def site_config_json(config_json: str) -> str | None:
    """A stored run config as its sites received it (the signed site config's JSON); None for
    a run recorded by an older version, whose config no longer reads as one."""
    try:
        return RunConfig.from_json(config_json).for_sites().to_json()
    except (FedpeftError, ValueError, TypeError, KeyError):
        return None


def flatten(value: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, leaf value) of nested JSON objects, keys sorted: ``federation.rounds``."""
    if isinstance(value, Mapping):
        for key in sorted(value):
            yield from flatten(value[key], f"{prefix}.{key}" if prefix else str(key))
    else:
        yield prefix, value


def build_card(store: RunStore, run_id: int | None = None, round: int | None = None) -> dict:
    """The card of ``run_id`` (default: the latest run) at ``round`` (default: its delivered
    round), as JSON-ready data."""
    run = store.get_run(run_id)
    rounds = sorted(store.rounds(run.id), key=lambda r: r.round)
    delivered = delivered_round(rounds)
    chosen = round if round is not None else (delivered.round if delivered else None)
    described = next((r for r in rounds if r.round == chosen), None)
    if round is not None and described is None:
        raise FedpeftError(f"run {run.id} has no round {round}")
    results = store.site_results(run.id)
    summary = summarize(store, run.id)
    config = json.loads(run.config_json)
    fed = config.get("federation", {})
    received = site_config_json(run.config_json)

    lineage = []
    for r in rounds:
        trains = [s for s in results if s.round == r.round and s.phase == Phase.TRAIN]
        lineage.append(
            {
                "round": r.round,
                "applied": r.applied,
                "contributed": sorted(s.site for s in trains if s.status == "ok"),
                "refused": [
                    {"site": s.site, "status": str(s.status), "reason": s.reason or ""}
                    for s in sorted(trains, key=lambda s: s.site)
                    if s.status != "ok"
                ],
                "pooled_auc": _num(r.pooled_auc),
            }
        )
    sites: dict[str, dict[str, Any]] = {}
    # Each site's own fine-tuning of one part after the run (federation.personalize), of the
    # delivered round only: not part of the exported adapter, and not kept at the site.
    personal = summary.personalized_part is not None and chosen == summary.selected_round
    for row in summary.rows:
        stated = sorted(
            {
                s.data_fingerprint
                for s in results
                if s.site == row.site and s.phase == Phase.TRAIN and s.data_fingerprint
            }
        )
        ev = next(
            (
                s
                for s in results
                if s.site == row.site
                and s.phase == Phase.EVALUATE
                and s.round == chosen
                and s.status == "ok"
            ),
            None,
        )
        sites[row.site] = {
            # More than one: the site's rows changed during the run (each as stated).
            "data_fingerprints": stated,
            "n_train": row.n_train,
            "n_test": ev.n if ev and ev.n is not None else row.n_test,
            "auc": _num(ev.auc) if ev else None,
            "auc_interval": [_num(ev.extra.get(AUC_LOW)), _num(ev.extra.get(AUC_HIGH))]
            if ev and AUC_LOW in ev.extra
            else None,
            "brier": _num(ev.brier) if ev else None,
            "alone_auc": _num(row.alone),
            "centralized_auc": _num(row.centralized),
        }
        if personal:
            sites[row.site]["personalized"] = {
                "auc": _num(row.personalized),
                "auc_interval": list(row.personalized_interval)
                if row.personalized_interval
                else None,
                # 0: no epoch lowered its validation loss; it kept the global part.
                "epochs": row.personal_epochs,
            }
    aucs = [s["auc"] for s in sites.values()]
    dp = fed.get("dp", {})
    secagg = fed.get("secure_aggregation", {})
    spent = [r.epsilon for r in rounds if r.epsilon is not None and r.round <= (chosen or 0)]
    return {
        "run": {
            "id": run.id,
            "status": run.status,
            "dataset": run.dataset,
            "seed": run.seed,
            "created_at": run.created_at.isoformat(),
            "finished_at": run.finished_at.isoformat() if run.finished_at else None,
            "rounds_recorded": len(rounds),
            "rounds_planned": fed.get("rounds"),
            "ended_early": summary.early_stop,
            "delivered_round": delivered.round if delivered else None,
            "described_round": chosen,
        },
        "base_model": {
            "name": run.model_name,
            "hub_id": hub_id(run.model_name),
            "fingerprint": run.model_fingerprint,
        },
        "method": {
            "name": run.method,
            "trainable_params": run.trainable_params,
            "total_params": run.total_params,
        },
        "site_config_sha256": config_hash(received) if received else None,
        "distilled_from": _distilled(summary),
        "schedule": summary.stages,
        "lineage": lineage,
        "sites": sites,
        "metrics": {
            "pooled_auc": _num(described.pooled_auc) if described else None,
            "pooled_auc_interval": [_num(described.pooled_low), _num(described.pooled_high)]
            if described and described.pooled_low is not None
            else None,
            "macro_auc": _num(sum(aucs) / len(aucs))
            if aucs and all(a is not None for a in aucs)
            else None,
            "pooled_brier": _num(described.pooled_brier) if described else None,
            "pooled_ece": _num(described.pooled_ece) if described else None,
            "alone_macro_auc": _num(summary.macro("alone")),
            "centralized_macro_auc": _num(summary.macro("centralized")),
            "personalized_part": summary.personalized_part if personal else None,
        },
        "privacy": {
            "sealed_uploads": True,
            "secure_aggregation": bool(secagg.get("enabled")),
            "differential_privacy": {
                "enabled": bool(dp.get("enabled")),
                "mode": dp.get("mode"),
                "clip": dp.get("clip"),
                "noise_multiplier": dp.get("noise_multiplier"),
                "delta": dp.get("delta"),
                "epsilon_spent": _num(spent[-1]) if spent else None,
            }
            if dp.get("enabled")
            else {"enabled": False},
            "histogram_bins": fed.get("histogram_bins"),
        },
        "software": _versions(),
    }


def _distilled(summary: Any) -> dict | None:
    """A student's teacher and how much of it the student keeps (``fedpeft distill``)."""
    c = summary.distilled
    if c is None:
        return None
    settings = summary.distill_settings or (None, None)
    return {
        "teacher_run": c.teacher.run_id,
        "temperature": settings[0],
        "alpha": settings[1],
        "teacher_layers": c.teacher.layers,
        "student_layers": c.student.layers,
        "teacher_total_params": c.teacher.total_params,
        "teacher_macro_auc": _num(c.teacher.macro_auc),
        "auc_retained": _num(c.retained),
    }


def to_json(card: dict) -> str:
    return json.dumps(card, indent=2, sort_keys=False)


def _f(x: Any, digits: int = 3) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def _yaml_front_matter(card: dict) -> list[str]:
    """The model card's metadata (Hugging Face's ``model-index`` for the results). Every
    string is written as JSON, which YAML reads as the same string."""
    run, metrics = card["run"], card["metrics"]

    def q(value: object) -> str:
        return json.dumps(value)

    results = [
        f"    - {{type: roc_auc, value: {metrics[key]}, name: {q(name)}}}"
        for key, name in (
            ("pooled_auc", "pooled AUC (every site's test rows)"),
            ("macro_auc", "macro AUC (mean over sites)"),
        )
        if metrics[key] is not None
    ]
    lines = ["---"]
    if card["base_model"]["hub_id"]:
        lines.append(f"base_model: {q(card['base_model']['hub_id'])}")
    lines += [
        "pipeline_tag: text-classification",
        f"tags: [fedpeft, federated-learning, peft, {q(card['method']['name'])}]",
    ]
    if results:
        lines += [
            "model-index:",
            f"- name: {q('fedpeft-run-' + str(run['id']))}",
            "  results:",
            "  - task: {type: text-classification}",
            f"    dataset: {{name: {q(run['dataset'])}, type: {q(run['dataset'])}}}",
            "    metrics:",
            *results,
        ]
    lines.append("---")
    return lines


def to_markdown(card: dict, *, front_matter: bool = True) -> str:
    run, model, method = card["run"], card["base_model"], card["method"]
    metrics, privacy = card["metrics"], card["privacy"]
    share = method["trainable_params"] / max(method["total_params"], 1)
    out = _yaml_front_matter(card) if front_matter else []
    out += [
        f"# fedpeft run {run['id']}: {method['name']} on {run['dataset']}",
        "",
        f"A {method['name']} adapter of `{model['name']}` trained by federated fine-tuning: "
        "each site trained on its own records and sent only an encrypted, signed update of the "
        f"shared parameters ({method['trainable_params']:,} of {method['total_params']:,}, "
        f"{100 * share:.2f} %).",
        "",
        "## Model",
        "",
        f"- base model: `{model['name']}`, fingerprint `{model['fingerprint']}`",
        f"- method: {method['name']}",
        f"- run: {run['id']} ({run['status']}), seed {run['seed']}, started {run['created_at']}",
        f"- rounds: {run['rounds_recorded']} recorded of {run['rounds_planned']} planned"
        f"{f' ({early})' if (early := run['ended_early']) else ''}; "
        f"delivered round {run['delivered_round']}; this card describes round "
        f"{run['described_round']}",
        f"- site config SHA-256 (as in each site's ledger): `{card['site_config_sha256']}`",
        *(
            [f"- schedule (what trained, by rounds): {'; '.join(card['schedule'])}"]
            if card.get("schedule")
            else []
        ),
        "",
        "## Lineage: who contributed to each round",
        "",
        "| round | sites whose update was used | refused | applied | pooled AUC |",
        "|---|---|---|---|---|",
    ]
    for r in card["lineage"]:
        refused = "; ".join(f"{x['site']} ({x['status']}: {x['reason']})" for x in r["refused"])
        out.append(
            f"| {r['round']} | {', '.join(r['contributed']) or '—'} | {refused or '—'} | "
            f"{'yes' if r['applied'] else 'no'} | {_f(r['pooled_auc'])} |"
        )
    out += [
        "",
        "## Sites",
        "",
        "Data fingerprint: SHA-256 of the site's rows as loaded, computed at the site and stated",
        "beside its updates (not signed); no row left the site.",
        "",
        "| site | data fingerprint | train rows | test rows | AUC [95 % interval] | Brier |"
        " alone AUC | centralized AUC |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, s in card["sites"].items():
        interval = s["auc_interval"]
        shown = _f(s["auc"]) + (
            f" [{_f(interval[0])}, {_f(interval[1])}]" if interval and interval[0] else ""
        )
        prints = "<br>".join(f"`{p}`" for p in s["data_fingerprints"]) or "not stated"
        out.append(
            f"| {name} | {prints} | {s['n_train'] or '—'} | {s['n_test'] or '—'} | {shown} | "
            f"{_f(s['brier'])} | {_f(s['alone_auc'])} | {_f(s['centralized_auc'])} |"
        )
    interval = metrics["pooled_auc_interval"]
    out += [
        "",
        "## Evaluation",
        "",
        f"- pooled AUC over every site's test rows: {_f(metrics['pooled_auc'])}"
        + (f" [{_f(interval[0])}, {_f(interval[1])}]" if interval else "")
        + " (from the pooled score histograms; no score left a site)",
        f"- macro AUC (mean over sites): {_f(metrics['macro_auc'])}; each site alone: "
        f"{_f(metrics['alone_macro_auc'])}; centralized: {_f(metrics['centralized_macro_auc'])}",
        f"- calibration: Brier {_f(metrics['pooled_brier'])}, expected calibration error "
        f"{_f(metrics['pooled_ece'])}",
        "",
    ]
    out += _personalized_lines(card)
    out += _distilled_lines(card)
    out += [
        "## Privacy",
        "",
        "- updates: sealed for the coordinator and signed by their site",
        f"- secure aggregation: {'on' if privacy['secure_aggregation'] else 'off'}",
    ]
    dp = privacy["differential_privacy"]
    if dp["enabled"]:
        out.append(
            f"- differential privacy ({dp['mode']}): clip {dp['clip']}, noise multiplier "
            f"{dp['noise_multiplier']}, ε {_f(dp['epsilon_spent'])} at δ {dp['delta']}"
        )
    else:
        out.append("- differential privacy: off")
    out += [
        f"- score histogram bins: {privacy['histogram_bins']}",
        "",
        "## Software (of the environment that wrote this card)",
        "",
        ", ".join(f"{k} {v}" for k, v in card["software"].items()),
        "",
    ]
    return "\n".join(out)


def _distilled_lines(card: dict) -> list[str]:
    d = card.get("distilled_from")
    if d is None:
        return []
    retained = d["auc_retained"]
    return [
        "## Distillation",
        "",
        f"- a student of {d['student_layers']} encoder layers (the base model's, evenly spaced, "
        f"the top one kept), distilled from run {d['teacher_run']} ({d['teacher_layers']} "
        f"layers, {d['teacher_total_params']:,} parameters, macro AUC "
        f"{_f(d['teacher_macro_auc'])}) at temperature {d['temperature']}, alpha {d['alpha']}",
        "- macro AUC retained: "
        + ("—" if retained is None else f"{100 * retained:.1f} % of the teacher's"),
        "- load it with `fedpeft.common.export.load_export(DIR)`, which builds the base model "
        "with the student's layers (`model.layers` in fedpeft-export.json); peft's own loader "
        "needs that base too",
        "",
    ]


def _personalized_lines(card: dict) -> list[str]:
    part = card["metrics"]["personalized_part"]
    if part is None:
        return []
    out = [
        "## Personalization (not part of this model)",
        "",
        f"After the run each site fine-tuned its own {part} of this model on its own training rows",
        "and sent back only the evaluation. That part never left the site and is not kept there:",
        "this adapter is the global model.",
        "",
        "| site | AUC, global | AUC, personalized [95 % interval] | epochs |",
        "|---|---|---|---|",
    ]
    for name, s in card["sites"].items():
        mine = s["personalized"]
        interval = mine["auc_interval"]
        shown = _f(mine["auc"]) + (f" [{_f(interval[0])}, {_f(interval[1])}]" if interval else "")
        kept = " (kept global)" if mine["epochs"] == 0 else ""
        epochs = "—" if mine["epochs"] is None else mine["epochs"]
        out.append(f"| {name} | {_f(s['auc'])} | {shown}{kept} | {epochs} |")
    return out + [""]


def to_html(card: dict) -> str:
    """The card as one HTML page (its Markdown body, laid out by the dashboard's templates)."""
    from fedpeft.dashboard import render_card

    return render_card(card)
