"""Reports for ``fastspec demo``, ``fastspec eval`` and the benchmarks: Markdown tables,
JSON and matplotlib PNG plots (Agg backend, so no display is ever needed).

Every function takes plain Python data (lists, dicts, floats), so the same helpers serve
the CLI, the tests and the benchmark scripts.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence


@dataclass(frozen=True)
class Column:
    """One table column: ``key`` into each row dict, its ``header`` and a value formatter."""

    key: str
    header: str
    fmt: Callable[[Any], str] = str


def fmt_float(digits: int = 2) -> Callable[[Any], str]:
    return lambda v: "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def fmt_ratio(digits: int = 2) -> Callable[[Any], str]:
    return lambda v: "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}×"


def fmt_bool(v: Any) -> str:
    if v is None:
        return "–"
    return "yes" if v else "**NO**"


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[Column]) -> str:
    """A GitHub-flavoured Markdown table; numbers right-aligned, text left-aligned."""
    if not columns:
        raise ValueError("markdown_table needs at least one column")
    cells = [[c.fmt(row.get(c.key)) for c in columns] for row in rows]
    def is_number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    present = [[row.get(c.key) for row in rows if row.get(c.key) is not None] for c in columns]
    numeric = [bool(vals) and all(is_number(v) for v in vals) for vals in present]
    header = "| " + " | ".join(c.header for c in columns) + " |"
    rule = "|" + "|".join("---:" if n else ":---" for n in numeric) + "|"
    body = ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in cells]
    return "\n".join([header, rule] + body)


def text_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[Column]) -> str:
    """The same table as fixed-width text, for the terminal."""
    cells = [[c.header for c in columns]] + [[c.fmt(row.get(c.key)) for c in columns] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = []
    for n, row in enumerate(cells):
        lines.append("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


# The columns every speculative-decoding result table shares (demo and eval).
SPEC_COLUMNS = [
    Column("name", "decoder"),
    Column("gamma", "γ", lambda v: "–" if v is None else str(v)),
    Column("acceptance_rate", "α", fmt_float(3)),
    Column("mean_accepted_length", "τ", fmt_float(2)),
    Column("tokens_per_s", "tokens/s", fmt_float(1)),
    Column("speedup", "speedup vs AR", fmt_ratio()),
    Column("ideal_speedup", "ideal speedup", fmt_ratio()),
    Column("identical", "identical to AR", fmt_bool),
]


def _positions(row) -> str:
    positions = row.get("divergence_positions") or []
    return ", ".join(str(p) for p in positions) if positions else "–"


def _near_tie(row) -> str:
    near, gap, tol = row.get("divergence_near_tie"), row.get("divergence_gap"), row.get("near_tie_tolerance")
    if near is None:
        return "–"
    where = f"gap {gap:.3g}" if gap is not None else "gap –"
    return f"{'yes' if near else 'NO'} (max {where}, tolerance {tol:g})"


AGREEMENT_COLUMNS = [
    Column("name", "decoder"),
    Column("token_agreement", "token agreement with AR", fmt_float(4)),
    Column("divergences", "diverging prompts", lambda v: "–" if v is None else str(v)),
    Column("first_divergence_text", "first divergence (token index per prompt)"),
    Column("near_tie_text", "near-tie (top-2 logit gap ≤ tolerance)"),
]


def agreement_table(rows: Sequence[Dict[str, Any]], markdown: bool = True) -> str:
    """Token agreement with autoregressive decoding, first divergences and their near-tie verdicts."""
    shown = [dict(r, first_divergence_text=_positions(r), near_tie_text=_near_tie(r)) for r in rows]
    columns = AGREEMENT_COLUMNS
    return markdown_table(shown, columns) if markdown else text_table(shown, columns)



def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_per_position_acceptance(per_position: Mapping[str, Sequence[float]], path: str, title: Optional[str] = None) -> str:
    """One line per drafter: P(draft position i accepted | reached), i = 1..γ."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for name, values in per_position.items():
        values = [float(v) for v in values]
        if values:
            ax.plot(range(1, len(values) + 1), values, marker="o", label=name)
    ax.set_xlabel("draft position")
    ax.set_ylabel("acceptance rate")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.set_title(title or "Per-position acceptance")
    if per_position:
        ax.legend(fontsize=8)
    return _save(fig, path)


def plot_speedup_vs_gamma(
    measured: Mapping[str, Mapping[int, float]],
    path: str,
    ideal: Optional[Mapping[str, Mapping[int, float]]] = None,
    title: Optional[str] = None,
) -> str:
    """Measured speedup over autoregressive (solid) and the ideal speedup (dashed) per γ."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for i, (name, by_gamma) in enumerate(measured.items()):
        color = f"C{i % 10}"
        gammas = sorted(by_gamma)
        ax.plot(gammas, [by_gamma[g] for g in gammas], marker="o", color=color, label=f"{name} (measured)")
        if ideal and name in ideal:
            ig = sorted(ideal[name])
            ax.plot(ig, [ideal[name][g] for g in ig], linestyle="--", color=color, alpha=0.7, label=f"{name} (ideal)")
    ax.axhline(1.0, color="gray", linewidth=0.8)
    ax.set_xlabel("γ (draft tokens per step)")
    ax.set_ylabel("speedup vs autoregressive")
    ax.grid(alpha=0.3)
    ax.set_title(title or "Speedup vs γ")
    if measured:
        ax.legend(fontsize=8)
    return _save(fig, path)


def plot_bars(values: Mapping[str, Mapping[str, float]], path: str, ylabel: str, title: Optional[str] = None,
              intervals: Optional[Mapping[str, Mapping[str, tuple]]] = None) -> str:
    """Grouped bars: ``values[group][series]``, e.g. α per drafter for baseline vs distilled;
    ``intervals[group][series]`` = (low, high) draws an error bar (e.g. a 95% bootstrap CI)."""
    plt = _pyplot()
    groups = list(values)
    series: List[str] = []
    for g in groups:
        series += [s for s in values[g] if s not in series]
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(groups) + 2), 4.0))
    width = 0.8 / max(1, len(series))
    for j, s in enumerate(series):
        xs = [i + (j - (len(series) - 1) / 2) * width for i in range(len(groups))]
        ys = [values[g].get(s, float("nan")) for g in groups]
        ax.bar(xs, ys, width=width, label=s)
        bounds = [(intervals or {}).get(g, {}).get(s) for g in groups]
        if any(b and None not in b for b in bounds):
            lows = [y - b[0] if b and None not in b else 0.0 for y, b in zip(ys, bounds)]
            highs = [b[1] - y if b and None not in b else 0.0 for y, b in zip(ys, bounds)]
            ax.errorbar(xs, ys, yerr=[lows, highs], fmt="none", ecolor="black", elinewidth=0.8, capsize=2)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, axis="y")
    ax.set_title(title or ylabel)
    if len(series) > 1:
        ax.legend(fontsize=8)
    return _save(fig, path)


def _save(fig, path: str) -> str:
    import matplotlib.pyplot as plt

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_json(data: Any, path: str) -> str:
    """JSON with NaN/inf written as null (strict JSON readers refuse NaN)."""

    def clean(x):
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {str(k): clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(clean(data), f, indent=2)
    return path


def write_markdown(path: str, title: str, sections: Sequence[tuple]) -> str:
    """``sections``: (heading, body) pairs; a body is Markdown text (tables, images, lists)."""
    parts = [f"# {title}", ""]
    for heading, body in sections:
        parts += [f"## {heading}", "", body.rstrip(), ""]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(parts))
    return path


def summarize_settings(settings: Dict[str, Any]) -> str:
    """A settings dict as a Markdown bullet list (what produced the numbers)."""
    return "\n".join(f"- **{k}:** `{v}`" for k, v in settings.items())
