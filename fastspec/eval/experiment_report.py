"""The report of ``fastspec experiment distill``: per cell α with its 95% bootstrap interval, τ, c
and the ideal speedup; per distilled cell α / α(baseline of the same drafter) with its paired
interval; the measured speed of each drafter's best cell. Written as results.json, results.md
and alpha.png (α per drafter and method, with error bars)."""
from __future__ import annotations

import os
from typing import Any, Dict, List, Mapping, Sequence

from fastspec import report
from fastspec.eval.bootstrap import alpha_interval, ratio_interval, resample_indices
from fastspec.metrics import ideal_speedup
from fastspec.report import Column, fmt_float, fmt_ratio

# the goal of the distillation issue: α(distilled) / α(baseline) ≥ 1.15 with the CI's lower bound above 1
RATIO_GOAL = 1.15


def _interval(pair) -> str:
    low, high = pair if pair else (None, None)
    return "–" if low is None else f"[{low:.3f}, {high:.3f}]"


def cell_records(cells: Sequence[Mapping[str, Any]], speed: Mapping[str, Mapping[str, Any]], gamma: int,
                 resamples: int, seed: int) -> List[Dict[str, Any]]:
    """One record per cell (failed cells keep their error), with intervals and ratios."""
    ok = [c for c in cells if c.get("status") == "ok"]
    num_prompts = len(ok[0]["beta_sums"]) if ok else 0
    index = resample_indices(num_prompts, resamples, seed) if num_prompts else None
    baselines = {c["drafter"]: c for c in ok if c["method"] == "baseline"}
    records = []
    for cell in cells:
        record = {k: v for k, v in cell.items() if k not in ("beta_sums", "row_steps")}
        if cell.get("status") == "ok":
            own = (cell["beta_sums"], cell["row_steps"])
            record["alpha_ci"] = alpha_interval(*own, index)
            c = speed.get(cell["drafter"], {}).get("c")
            record["c"] = c
            record["ideal_speedup"] = ideal_speedup(cell["alpha"], gamma, c) if c is not None else None
            base = baselines.get(cell["drafter"])
            if base is not None and cell["method"] != "baseline" and base["alpha"] > 0:
                record["ratio"] = cell["alpha"] / base["alpha"]
                record["ratio_ci"] = ratio_interval(own, (base["beta_sums"], base["row_steps"]), index)
                low = record["ratio_ci"][0]
                record["meets_goal"] = record["ratio"] >= RATIO_GOAL and low is not None and low > 1.0
        records.append(record)
    return records


CELL_COLUMNS = [
    Column("drafter", "drafter"),
    Column("method", "method"),
    Column("alpha", "α", fmt_float(3)),
    Column("alpha_ci_text", "α 95% CI"),
    Column("tau", "τ", fmt_float(2)),
    Column("ratio", "α / baseline", fmt_ratio()),
    Column("ratio_ci_text", "ratio 95% CI"),
    Column("c", "c", fmt_float(3)),
    Column("ideal_speedup", "ideal speedup", fmt_ratio()),
    Column("train_s", "train s", fmt_float(0)),
    Column("status_text", "status"),
]
SPEED_COLUMNS = [
    Column("drafter", "drafter"),
    Column("cell", "best cell"),
    Column("engine_alpha", "α (engine)", fmt_float(3)),
    Column("c", "c", fmt_float(3)),
    Column("speedup", "measured speedup vs AR", fmt_ratio()),
    Column("identical", "identical to AR", report.fmt_bool),
]


def _table_rows(records: Sequence[Mapping[str, Any]]) -> List[Dict[str, Any]]:
    rows = []
    for r in records:
        row = dict(r, alpha_ci_text=_interval(r.get("alpha_ci")), ratio_ci_text=_interval(r.get("ratio_ci")))
        row["status_text"] = "ok" if r.get("status") == "ok" else f"FAILED: {r.get('error', '')}"
        rows.append(row)
    return rows


def write_grid_report(out_dir: str, cells: Sequence[Mapping[str, Any]], speed: Mapping[str, Mapping[str, Any]],
                      stats: Mapping[str, Any], settings: Mapping[str, Any], gamma: int, resamples: int,
                      seed: int) -> Dict[str, Any]:
    records = cell_records(cells, speed, gamma, resamples, seed)
    speed_rows = [dict(row, drafter=drafter) for drafter, row in speed.items()]
    alpha = {r["drafter"]: {} for r in records}
    bars = {r["drafter"]: {} for r in records}
    for r in records:
        if r.get("status") == "ok":
            alpha[r["drafter"]][r["method"]] = r["alpha"]
            bars[r["drafter"]][r["method"]] = tuple(r["alpha_ci"])
    plot = report.plot_bars(alpha, os.path.join(out_dir, "alpha.png"), "α (replay, greedy)",
                            "α per cell (95% bootstrap CI)", intervals=bars)
    cell_table = report.markdown_table(_table_rows(records), CELL_COLUMNS)
    speed_table = report.markdown_table(speed_rows, SPEED_COLUMNS) if speed_rows else "not run (--speed_prompts 0, or no finished cell)"
    failed = [r for r in records if r.get("status") != "ok"]
    notes = [f"- {len(records) - len(failed)} of {len(records)} cells finished"
             + (f"; failed: {', '.join(r['drafter'] + '-' + r['method'] for r in failed)}" if failed else ""),
             f"- α by exact offline replay of the target's greedy outputs; CIs: {resamples} bootstrap resamples over "
             "prompts (paired for the ratio)",
             f"- ratio goal: α / baseline ≥ {RATIO_GOAL} with the CI's lower bound above 1: met by "
             + (", ".join(f"{r['drafter']}-{r['method']}" for r in records if r.get("meets_goal")) or "no cell")]
    markdown = report.write_markdown(os.path.join(out_dir, "results.md"), "fastspec experiment distill", [
        ("Cells", cell_table + "\n\n" + "\n".join(notes)),
        ("Speed of each drafter's best cell (real engine, greedy, batch 1)", speed_table),
        ("α", f"![α per cell]({os.path.basename(plot)})"),
        ("Data", report.summarize_settings(dict(stats))),
        ("Settings", report.summarize_settings(dict(settings))),
    ])
    report.write_json({"settings": dict(settings), "data": dict(stats), "cells": records, "speed": speed},
                      os.path.join(out_dir, "results.json"))
    with open(markdown, encoding="utf-8") as handle:
        text = handle.read()
    return {"cells": records, "speed": dict(speed), "markdown": text}


__all__ = ["cell_records", "write_grid_report", "RATIO_GOAL"]
