"""`imm usage`: the slot usage analysis (which slots are read, and how evenly)."""

from __future__ import annotations

from rich.table import Table

from imm_cli.cli.common import console, fmt
from imm_cli.cli.store import USAGE_JSON, USAGE_PNG, experiment_command, memory_rows


def _slots(xs: list[int]) -> str:
    return ", ".join(map(str, xs)) if xs else "none"


def _tables(r) -> None:
    t = Table(title=f"imm usage: {r.run}")
    t.add_column("figure")
    t.add_column("value", justify="right")
    memory_rows(t, r)
    t.add_row("mean usage per slot (1.0 by construction)", "1.000")
    t.add_row("normalised entropy of slot means (1 = even)", fmt(r.entropy))
    t.add_row("min/max ratio of slot means (1 = even)", fmt(r.min_max_ratio))
    t.add_row("coefficient of variation (0 = even)", fmt(r.cv))
    ps = r.per_sequence
    t.add_row("per sequence: entropy / min-max / cv (means)",
              f"{fmt(ps['entropy_mean'])} / {fmt(ps['min_max_ratio_mean'])} / {fmt(ps['cv_mean'])}")
    t.add_row("dead slots (mean usage < 0.1)", _slots(r.dead_slots))
    t.add_row("dominant slots (mean usage > 3)", _slots(r.dominant_slots))
    rm = [x for x in r.read_mass if x == x]
    t.add_row("read attention on slots per token", fmt(sum(rm) / len(rm)) if rm else "-")
    if r.local_mass is not None:
        lm = [x for x in r.local_mass if x == x]
        t.add_row("read attention on the segment's own bytes per token", fmt(sum(lm) / len(lm)) if lm else "-")
    for g in r.gates:
        t.add_row(f"read gate, block {g['layer']}: mean ± std (min..max)",
                  f"{fmt(g['mean'])} ± {fmt(g['std'])} ({fmt(g['min'])}..{fmt(g['max'])})")
    if r.undefined_rows:
        t.add_row("sequences with nothing to read (usage undefined)", str(r.undefined_rows))
    t.add_row("NaN/inf seen", "yes" if r.nonfinite else "no")
    ret = r.retention
    if ret.get("budget"):
        t.add_row("entries kept / budget (after the last sequence)", f"{ret['entries']:,} / {ret['budget']:,}")
    if "score_median" in ret:
        t.add_row("surprise of kept entries, nats: min / median / max",
                  f"{fmt(ret['score_min'])} / {fmt(ret['score_median'])} / {fmt(ret['score_max'])}")
        t.add_row("age of kept entries in segments: median (max)", f"{ret['age_median']:.0f} ({ret['age_max']:.0f} of {ret['writes']})")
        t.add_row("kept entries written in the first half of the stream", fmt(ret["kept_from_first_half"]))
    console.print(t)

    s = Table(title="per slot")
    s.add_column("slot", justify="right")
    s.add_column("mean usage", justify="right")
    s.add_column("min", justify="right")
    s.add_column("max", justify="right")
    if r.writes is not None:
        s.add_column("share of writes", justify="right")
    for j, m in enumerate(r.slot_mean):
        flag = " dead" if j in r.dead_slots else " dominant" if j in r.dominant_slots else ""
        row = [str(j), fmt(m) + flag, fmt(r.slot_min[j]), fmt(r.slot_max[j])]
        if r.writes is not None:
            row.append(fmt(r.writes[j]))
        s.add_row(*row)
    console.print(s)


usage = experiment_command(
    "imm_cli.experiments.usage:slot_usage", USAGE_JSON, USAGE_PNG, "imm_cli.plots.store_usage:plot_slot_usage", _tables,
    "Print one JSON document with every figure and the usage matrix on stdout.",
    "Slot usage analysis: read attention per slot (slot mean = 1), evenness that can fail, gate values.")
