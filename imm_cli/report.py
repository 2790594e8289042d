"""`imm report`: one self-contained HTML page of one or more run folders, side by side.

The page shows what a researcher would otherwise dig for in a run folder: the configuration and
size of the run, its training curve, the validation loss with the memory carried and ablated, and
every experiment found there (store.json, usage.json, recall.json, needle.json, a sweep's
sweep.jsonl, any other result JSON such as compare.json), each with its verdict, its tables (the
controls in the same table as the measured figure), and its plots; an experiment not run yet gets a
note with the command that runs it.

Self-contained: no network, no script, no external stylesheet; PNGs are embedded as base64 data
URIs. Every text taken from a file is escaped. Fields may be missing or new: any dict of
condition -> metrics is a table, any dict of equal-length lists is a table, any matrix with axis
lists is a table, any curve (x lists and condition -> metric -> values) is a table a row per x, so
new results appear without a change here. Every number taken from a result file sits in an element
carrying `data-key="FILE:PATH"` (e.g. `needle.json:conditions.memory.exact_match`; in a .jsonl file
PATH starts with the index of the row among its readable rows), inside the column of its folder
(`data-run`): that is how tests (and scripts) find the figure of a JSON file on the page.

Plain Python: no torch, no typer, no rich (the CLI writes the file).
"""

from __future__ import annotations

import base64
import datetime
import html
import json
import math
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imm_cli.errors import InputError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MAX_IMAGE_BYTES = 20 * 2**20  # a bigger PNG is named, not embedded
MAX_ROWS = 200  # rows shown of a long table (the rest is counted)
LONG = 12  # lists and tables longer than this are folded (<details>)
MAX_DEPTH = 5  # deeper nesting is shown as escaped JSON
DEFAULT_FACTS = "examples/facts.txt"

CONFIG, METRICS, SWEEP_JSONL, COMPARE_JSON = "config.json", "metrics.jsonl", "sweep.jsonl", "compare.json"
NOT_RESULTS = {CONFIG, "sweep_settings.json"}  # JSON files of a folder that are not experiment results

# condition keys of result dicts: their label, and whether a row is a control ("control"), an upper
# bound ("bound") or the measured condition (None)
CONDITIONS = {
    "memory": ("memory (facts written)", None),
    "carried": ("memory carried", None),
    "fresh": ("fresh memory", "control"),
    "other_facts": ("memory written with other facts", "control"),
    "in_context": ("fact in the attention window (upper bound)", "bound"),
    "ablated": ("memory read ablated", "control"),
    "initial": ("memory in its initial state", "control"),
    "random": ("random unit vectors", "control"),
    "other_sequence": ("slots vs another sequence", "control"),
    "baseline": ("baseline", "control"),
    "text_only": ("text only, no memory read", "control"),
    "control": ("control", "control"),
}
LABELS = {
    "exact_match": "exact match", "char_accuracy": "char accuracy", "loss_per_byte": "loss/byte (nats)",
    "recall_at_1": "recall@1", "val_loss": "validation loss (nats/byte)", "val_loss_ablated": "validation loss, read ablated",
    "loss": "train loss (nats/byte)", "recall_acc": "curriculum answer bytes right", "recall_acc_ablated": "the same, read ablated",
    "tokens_per_s": "tokens/s", "grad_norm": "gradient norm", "lr": "learning rate", "n_facts": "facts in one memory",
    "mean_kl_rest": "KL on the facts' rests (nats/byte)", "mean_kl_prompt": "KL on the prompts (nats/byte)",
    "min_max_ratio": "min/max ratio", "cv": "coefficient of variation", "nonfinite": "NaN/inf seen",
    "lengths": "haystack length (bytes)", "depths": "depth", "length": "haystack length (bytes)", "depth": "depth",
    "slot_cosine": "slot-to-slot cosine", "best_slot_mean": "best slot, mean", "entropy": "normalised entropy",
}

# the experiments a run folder can hold: JSON file, title, what it measures, its plots (beyond
# those its "files" entry names), the command that makes it, and what its controls are
@dataclass(frozen=True)
class Experiment:
    name: str
    title: str
    measures: str
    plots: tuple[str, ...]
    command: str
    needs_memory: bool = True

    @property
    def json(self) -> str:
        return f"{self.name}.json"


EXPERIMENTS = (
    Experiment("store", "Pattern storage (imm store)",
               "cosine between the memory slots and the mean hidden state of each sequence just written, "
               "memory carried across consecutive validation sequences; beside it the same cosine for another "
               "sequence, for random unit vectors and for the memory in its initial state (controls)",
               ("pattern_similarity.png",), "imm store --run {run}"),
    Experiment("usage", "Slot usage (imm usage)",
               "read attention mass per slot and sequence, normalised to a slot mean of 1 (so the mean "
               "usage is 1.0 by construction); evenness that can fail: entropy, min/max ratio, coefficient "
               "of variation, dead and dominant slots, and the read gate",
               ("slot_usage_heatmap.png", "optimal_config_results.png"), "imm usage --run {run}"),
    Experiment("recall", "Recall of facts shown once (imm recall)",
               "every fact shown once with memory updates on, then each completed greedily from its "
               "two-word cue with the memory frozen; control: the same cues with a fresh memory",
               ("context_influence.png",), "imm recall --run {run} --facts " + DEFAULT_FACTS),
    Experiment("needle", "Needle in a haystack (imm needle)",
               "each fact written once inside other text, recalled later in a new context from its cue; "
               "controls: a fresh memory and a memory written with other facts; upper bound: the fact "
               "inside the attention window",
               ("needle_heatmap.png", "capacity.png"), "imm needle --run {run} --facts " + DEFAULT_FACTS),
)

# what each known figure shows and which controls it draws (unknown PNGs are captioned by name)
CAPTIONS = {
    "loss.png": "Training loss per step and validation loss with the memory carried and with its read "
                "ablated (the control), in nats per byte.",
    "pattern_similarity.png": "Pattern similarity s_t per sequence (± std over slots, best slot) with its "
                              "controls in the same axes: another sequence, random unit vectors, initial memory.",
    "slot_usage_heatmap.png": "Read attention per sequence and slot (slot mean = 1 per row), and the per-slot "
                              "mean with min..max, against the even line (1.0) and the dead/dominant thresholds.",
    "optimal_config_results.png": "Pattern storage and slot usage side by side (the notes' combined figure).",
    "context_influence.png": "KL divergence between next-byte predictions with the memory read on and off, "
                             "per position of the prompt and of the fact's rest.",
    "needle_heatmap.png": "Needle recall of the memory condition over haystack length x depth of the fact "
                          "(exact match and character accuracy).",
    "capacity.png": "Needle recall as more facts are written into one memory, with the fresh-memory control "
                    "as horizontal lines.",
}


# --- formatting ------------------------------------------------------------------------------------
def esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def is_scalar(v: Any) -> bool:
    return v is None or isinstance(v, (bool, int, float, str))


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


WHOLE = {"tokens_per_s", "params", "memory_params"}  # figures shown without decimals


def fmt(v: Any, key: Any = None) -> str:
    """A JSON value as the page shows it (not escaped); `key` (the field's name) may ask for no decimals."""
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        if abs(v) >= 1000 or key in WHOLE:
            return f"{v:,.0f}"
        if v != 0 and abs(v) < 0.01:
            return f"{v:.3g}"
        return f"{v:.3f}"
    return str(v)


def label(key: Any) -> str:
    k = str(key)
    return LABELS.get(k, k.replace("_", " "))


def cond_label(key: Any) -> str:
    """The label of a condition row (memory, fresh, ...), else of a plain key."""
    k = str(key)
    return CONDITIONS[k][0] if k in CONDITIONS else label(k)


def dkey(src: str, path: list) -> str:
    return f"{src}:{'.'.join(str(p) for p in path)}"


def val(src: str, path: list, v: Any) -> str:
    """One value; numbers (and bools, None) carry data-key so the page can be checked against the file."""
    text = esc(fmt(v, path[-1] if path else None))
    if v is None:
        return f'<span class="na" data-key="{esc(dkey(src, path))}" title="undefined (null in {esc(src)})">{text}</span>'
    if isinstance(v, (bool, int, float)):
        return f'<span class="v" data-key="{esc(dkey(src, path))}">{text}</span>'
    return f'<span class="s">{text}</span>'


def get(d: Any, *path: Any) -> Any:
    for p in path:
        if isinstance(d, dict):
            d = d.get(p)
        elif isinstance(d, list) and isinstance(p, int) and -len(d) <= p < len(d):
            d = d[p]
        else:
            return None
    return d


def pm(src: str, d: dict, path: list, mean: str = "mean", std: str = "std") -> str:
    """`mean ± std` of a dict at `path` (either may be missing)."""
    sub = get(d, *path)
    if not isinstance(sub, dict) or mean not in sub:
        return '<span class="na">–</span>'
    out = val(src, path + [mean], sub.get(mean))
    if sub.get(std) is not None:
        out += " ± " + val(src, path + [std], sub.get(std))
    return out


def row_class(key: Any) -> str:
    kind = CONDITIONS.get(str(key), (None, None))[1]
    return f' class="{kind}"' if kind else ""


def tag(key: Any) -> str:
    kind = CONDITIONS.get(str(key), (None, None))[1]
    return {"control": ' <span class="tag">control</span>', "bound": ' <span class="tag bound">upper bound</span>'}.get(kind, "")


def fold(summary: str, body: str, n: int) -> str:
    """Long content in a closed <details>; short content as it is."""
    if n <= LONG:
        return body
    return f"<details><summary>{esc(summary)}</summary>{body}</details>"


# --- generic rendering of any JSON value -------------------------------------------------------------
def render(src: str, path: list, v: Any, depth: int = 0) -> str:
    if is_scalar(v):
        return f"<p>{val(src, path, v)}</p>"
    if depth >= MAX_DEPTH:
        text = json.dumps(v, indent=1)[:20000]
        return f"<details><summary>{esc(path[-1] if path else 'value')} (raw JSON)</summary><pre>{esc(text)}</pre></details>"
    if isinstance(v, dict):
        return render_dict(src, path, v, depth)
    return render_list(src, path, v, depth)


def condition_table(src: str, path: list, d: dict) -> str | None:
    """{condition: {metric: number}} -> one row per condition, one column per metric (x_std merged as ±)."""
    if not d or not all(isinstance(x, dict) and x for x in d.values()):
        return None
    cols: list[str] = []
    for x in d.values():
        if not all(is_scalar(y) or isinstance(y, list) for y in x.values()):
            return None
        for k, y in x.items():
            if k not in cols and not k.endswith("_std") and (is_scalar(y) or (isinstance(y, list) and len(y) <= LONG and all(is_scalar(z) for z in y))):
                cols.append(k)
    if not cols:
        return None
    head = "".join(f"<th>{esc(label(c))}</th>" for c in cols)
    rows = []
    for cond, x in d.items():
        cells = []
        for c in cols:
            y = x.get(c)
            if isinstance(y, list):
                cell = ", ".join(val(src, path + [cond, c, i], z) for i, z in enumerate(y))
            else:
                cell = val(src, path + [cond, c], y)
                if f"{c}_std" in x:
                    cell += " ± " + val(src, path + [cond, f"{c}_std"], x[f"{c}_std"])
            cells.append(f'<td class="num">{cell}</td>')
        rows.append(f"<tr{row_class(cond)}><th>{esc(cond_label(cond))}{tag(cond)}</th>{''.join(cells)}</tr>")
    return f'<table class="data"><thead><tr><th></th>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def _is_matrix(v: Any) -> bool:
    return (isinstance(v, list) and len(v) > 0 and all(isinstance(r, list) and r for r in v)
            and len({len(r) for r in v}) == 1 and all(is_scalar(x) for r in v for x in r))


def matrix_table(src: str, path: list, m: list, rows_axis: tuple[str, list] | None, cols_axis: tuple[str, list] | None) -> str:
    n_cols = len(m[0])
    corner = esc(f"{label(rows_axis[0])} \\ {label(cols_axis[0])}" if rows_axis and cols_axis else "")
    head = "".join(f"<th>{esc(label(cols_axis[0]) + ' ' + axis(c)) if cols_axis else j}</th>"
                   for j, c in enumerate(cols_axis[1] if cols_axis else range(n_cols)))
    body = []
    for i, r in enumerate(m[:MAX_ROWS]):
        name = axis(rows_axis[1][i]) if rows_axis else str(i)
        body.append(f"<tr><th>{esc(name)}</th>" + "".join(f'<td class="num">{val(src, path + [i, j], x)}</td>' for j, x in enumerate(r)) + "</tr>")
    more = f'<p class="more">{len(m) - MAX_ROWS} more rows in {esc(src)}</p>' if len(m) > MAX_ROWS else ""
    return f'<table class="data"><thead><tr><th>{corner}</th>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>{more}'


def axis(v: Any) -> str:
    """An axis value: as short as it is (0.5, not 0.500)."""
    return f"{v:g}" if isinstance(v, float) else fmt(v)


def curve_table(src: str, path: list, d: dict, axes: list[str], series: dict) -> str:
    """x columns (the axes), then one column per condition and metric; controls marked."""
    n = len(d[axes[0]])
    cols = [(c, m) for c, v in series.items() for m in v]
    head = "".join(f"<th>{esc(label(a))}</th>" for a in axes)
    head += "".join(f"<th{row_class(c)}>{esc(cond_label(c))}: {esc(label(m))}</th>" for c, m in cols)
    body = []
    for i in range(min(n, MAX_ROWS)):
        cells = "".join(f'<td class="num">{val(src, path + [a, i], d[a][i])}</td>' for a in axes)
        cells += "".join(f'<td class="num">{val(src, path + [c, m, i], series[c][m][i])}</td>' for c, m in cols)
        body.append(f"<tr>{cells}</tr>")
    return f'<div class="scroll"><table class="data"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'


def columnar_table(src: str, path: list, d: dict, keys: list[str]) -> str:
    """{a: [..], b: [..]} of equal lengths -> one row per index, one column per key."""
    n = len(d[keys[0]])
    head = "".join(f"<th>{esc(label(k))}</th>" for k in keys)
    body = []
    for i in range(min(n, MAX_ROWS)):
        body.append("<tr>" + "".join(f'<td class="num">{val(src, path + [k, i], d[k][i])}</td>' for k in keys) + "</tr>")
    more = f'<p class="more">{n - MAX_ROWS} more rows in {esc(src)}</p>' if n > MAX_ROWS else ""
    return f'<table class="data"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>{more}'


def kv_table(src: str, path: list, items: list[tuple[str, Any]]) -> str:
    rows = "".join(f"<tr{row_class(k)}><th>{esc(label(k))}{tag(k)}</th><td class=\"num\">{val(src, path + [k], v)}</td></tr>"
                   for k, v in items)
    return f'<table class="kv"><tbody>{rows}</tbody></table>'


def render_dict(src: str, path: list, d: dict, depth: int, skip: set | None = None) -> str:
    skip = skip or set()
    items = [(k, v) for k, v in d.items() if k not in skip]
    if not items:
        return ""
    cond = condition_table(src, path, dict(items))
    if cond is not None:
        return cond
    parts: list[str] = []
    used: set = set()
    # matrices, with the lists whose lengths match their rows and columns as axes
    lists = {k: v for k, v in items if isinstance(v, list) and v and all(is_scalar(x) for x in v)}
    for k, v in items:
        if _is_matrix(v):
            r_ax = next(((a, x) for a, x in lists.items() if len(x) == len(v) and a not in used), None)
            c_ax = next(((a, x) for a, x in lists.items() if len(x) == len(v[0]) and (not r_ax or a != r_ax[0])), None)
            used.add(k)
            parts.append(f"<h5>{esc(label(k))}</h5>" + fold(f"{label(k)}: {len(v)} x {len(v[0])}",
                                                          matrix_table(src, path + [k], v, r_ax, c_ax), len(v)))
    if used:
        used |= {a for a, x in lists.items() if any(len(x) in (len(d[m]), len(d[m][0])) for m in used)}
    # curves: axis lists of length n and {condition: {metric: [n values]}}: one table, a row per x
    series = {k: v for k, v in items if k not in used and isinstance(v, dict) and v
              and all(isinstance(x, list) and all(is_scalar(y) for y in x) for x in v.values())}
    lengths = {len(x) for v in series.values() for x in v.values()}
    if series and len(lengths) == 1:
        n = lengths.pop()
        axes = [k for k, v in lists.items() if len(v) == n and k not in used]
        if axes:
            used |= set(series) | set(axes)
            parts.append(fold(f"{label(axes[0])}: {n} points", curve_table(src, path, d, axes, series), n))
    # equal-length lists: one table
    rest_lists = {k: v for k, v in lists.items() if k not in used}
    by_len: dict[int, list[str]] = {}
    for k, v in rest_lists.items():
        by_len.setdefault(len(v), []).append(k)
    for n, keys in by_len.items():
        if len(keys) >= 2:
            used |= set(keys)
            parts.append(fold(f"{', '.join(label(k) for k in keys)} ({n} rows)", columnar_table(src, path, d, keys), n))
    scalars = [(k, v) for k, v in items if is_scalar(v) and k not in used]
    if scalars:
        parts.insert(0, kv_table(src, path, scalars))
    for k, v in items:
        if k in used or is_scalar(v):
            continue
        inner = render(src, path + [k], v, depth + 1)
        if inner:
            parts.append(f"<h5>{esc(label(k))}</h5>{inner}")
    return "".join(parts)


def render_list(src: str, path: list, v: list, depth: int) -> str:
    if not v:
        return '<p class="na">(empty)</p>'
    if all(is_scalar(x) for x in v):
        body = ", ".join(val(src, path + [i], x) for i, x in enumerate(v[:MAX_ROWS * 5]))
        return fold(f"{len(v)} values", f'<p class="series">{body}</p>', len(v))
    if _is_matrix(v):
        return fold(f"{len(v)} x {len(v[0])}", matrix_table(src, path, v, None, None), len(v))
    if all(isinstance(x, dict) for x in v):
        return fold(f"{len(v)} rows", rows_table(src, path, v), len(v))
    return "".join(f"<h5>{i}</h5>{render(src, path + [i], x, depth + 1)}" for i, x in enumerate(v[:MAX_ROWS]))


def _flatten(d: dict, prefix: tuple = ()) -> list[tuple[tuple, Any]]:
    out = []
    for k, v in d.items():
        if isinstance(v, dict) and len(prefix) < 2:
            out += _flatten(v, prefix + (k,))
        else:
            out.append((prefix + (k,), v))
    return out


def rows_table(src: str, path: list, rows: list[dict], keypath=None) -> str:
    """A list of dicts -> one row each; nested dicts become 'outer: inner' columns.

    `keypath(i, key)` gives the JSON path of a cell where the rows were reshaped (default: path + [i, *key])."""
    cols: list[tuple] = []
    flat = [_flatten(r) for r in rows[:MAX_ROWS]]
    for fr in flat:
        for k, _ in fr:
            if k not in cols:
                cols.append(k)
    head = "".join(f"<th>{esc(': '.join(label(p) for p in k))}</th>" for k in cols)
    body = []
    for i, fr in enumerate(flat):
        m = dict(fr)
        cells = []
        for k in cols:
            x = m.get(k)
            if is_scalar(x):
                cell = val(src, keypath(i, k) if keypath else path + [i, *k], x) if k in m else ""
            else:
                cell = esc(json.dumps(x)[:200])
            cells.append(f'<td class="{"num" if is_number(x) else "txt"}">{cell}</td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    more = f'<p class="more">{len(rows) - MAX_ROWS} more rows in {esc(src)}</p>' if len(rows) > MAX_ROWS else ""
    return f'<div class="scroll"><table class="data"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>{more}'


# --- reading a folder ----------------------------------------------------------------------------------
@dataclass
class Doc:
    name: str
    data: Any = None
    error: str | None = None
    mtime: float = 0.0


@dataclass
class RunFolder:
    path: Path
    shown: str  # the path as given on the command line
    config: Doc | None = None
    metrics: list[dict] = field(default_factory=list)
    results: dict[str, Doc] = field(default_factory=dict)  # file name -> document
    sweep: list[dict] = field(default_factory=list)
    pngs: dict[str, Path] = field(default_factory=dict)
    claimed: set = field(default_factory=set)  # PNG names shown in a section

    @property
    def is_run(self) -> bool:
        return self.config is not None and isinstance(self.config.data, dict)

    @property
    def has_memory(self) -> bool:
        slots = get(self.config.data, "model", "memory", "slots") if self.is_run else None
        return not isinstance(slots, int) or slots > 0


def _read_json(path: Path) -> Doc:
    d = Doc(path.name)
    try:
        d.mtime = path.stat().st_mtime
        d.data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        d.error = f"unreadable ({e.__class__.__name__})"
    return d


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return rows
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            continue  # a torn line of an append-only log
        if isinstance(row, dict):
            rows.append(row)
    return rows


def check_folder(path: Path) -> None:
    """A folder to report on exists and is a folder (InputError naming it otherwise)."""
    if not path.exists():
        raise InputError(f"{path} does not exist")
    if not path.is_dir():
        raise InputError(f"{path} is not a folder (expected a run folder made by `imm train`)")


def read_folder(path: Path) -> RunFolder:
    path = Path(path)
    check_folder(path)
    f = RunFolder(path=path, shown=str(path))
    if (path / CONFIG).is_file():
        f.config = _read_json(path / CONFIG)
        if f.config.error or not isinstance(f.config.data, dict):  # as every other command refuses it
            raise InputError(f"{path / CONFIG} is damaged: " + ("not valid JSON" if f.config.error else "not a JSON object"))
    f.metrics = _read_jsonl(path / METRICS)
    f.sweep = _read_jsonl(path / SWEEP_JSONL)
    for p in sorted(path.glob("*.json")):
        if p.name not in NOT_RESULTS and not p.name.startswith(".") and not p.name.endswith(".out.json") and p.is_file():
            f.results[p.name] = _read_json(p)
    if f.config is None and not f.sweep and not f.results:
        raise InputError(f"{path} holds nothing imm made: no {CONFIG} (a run), no {SWEEP_JSONL} (a sweep), "
                         f"no result JSON (e.g. {COMPARE_JSON} of imm compare)")
    for p in sorted(path.glob("*.png")):
        if p.is_file():
            f.pngs[p.name] = p
    return f


# --- pieces of the page ----------------------------------------------------------------------------------
def image(f: RunFolder, name: str, caption: str | None = None) -> str:
    """A PNG of the folder as a data URI in a <figure>, or a note saying why it is not shown."""
    f.claimed.add(name)
    p = f.pngs.get(name)
    cap = esc(caption or CAPTIONS.get(name, name))
    if p is None:
        return ""
    try:
        data = p.read_bytes()
    except OSError as e:
        return f'<p class="warn">{esc(name)} cannot be read ({esc(e.strerror or e)})</p>'
    if not data.startswith(PNG_MAGIC):
        return f'<p class="warn">{esc(name)} is not a PNG file; not shown</p>'
    if len(data) > MAX_IMAGE_BYTES:
        return f'<p class="warn">{esc(name)} is {len(data) / 2**20:.0f} MB; not embedded (open it from the run folder)</p>'
    uri = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
    return (f'<figure><img src="{uri}" alt="{esc(name)}" data-file="{esc(name)}">'
            f'<figcaption><b>{esc(name)}</b> {cap}</figcaption></figure>')


def plots_of(f: RunFolder, doc: Any, defaults: tuple[str, ...]) -> list[str]:
    """PNG names of an experiment: those its JSON lists under "files", then the known defaults."""
    names: list[str] = []
    files = doc.get("files") if isinstance(doc, dict) else None
    if isinstance(files, dict):
        for v in files.values():
            if isinstance(v, str) and v.lower().endswith(".png"):
                names.append(Path(v).name)
    for n in defaults:
        if n not in names:
            names.append(n)
    return [n for n in names if n in f.pngs]


def command(exp: Experiment, f: RunFolder) -> str:
    return exp.command.format(run=shlex.quote(f.shown))


def not_run(text: str, cmd: str | None = None) -> str:
    c = f'<pre class="cmd">{esc(cmd)}</pre>' if cmd else ""
    return f'<div class="missing">{esc(text)}{c}</div>'


def verdict_box(text: str, kind: str = "") -> str:
    return f'<div class="verdict {kind}"><b>verdict</b> {esc(text)}</div>'


def notes_list(notes: Any) -> str:
    if not isinstance(notes, list) or not notes:
        return ""
    return '<ul class="notes">' + "".join(f"<li>note: {esc(n)}</li>" for n in notes) + "</ul>"


def stale_note(f: RunFolder, doc: Doc) -> str:
    if f.config is not None and doc.mtime and f.config.mtime and doc.mtime < f.config.mtime - 1:
        return '<p class="warn">measured before the run\'s last checkpoint: run the command again for the current weights</p>'
    return ""


# an experiment's inference-time overrides: its JSON's model key -> (the run's memory field, the flag)
OVERRIDES = {"knn_lm": ("knn_lm", "--knn-lm"), "knn_exact": ("knn_exact", "--knn-exact"), "far_weight": ("far_weight", "--far-weight"),
             "memory_size": ("size", "--memory-size")}


def overrides_of(measured: Any, run_memory: Any) -> list[str]:
    """['--memory-size 16 (the run's: 16384)', ...]: where a result's recorded inference settings
    (its JSON's "model") differ from the run's own config (model.memory), i.e. what was overridden."""
    if not isinstance(measured, dict) or not isinstance(run_memory, dict):
        return []
    out = []
    for key, (field_, flag) in OVERRIDES.items():
        got, own = measured.get(key), run_memory.get(field_)
        if is_number(got) and is_number(own) and got != own:
            out.append(f"{flag} {got:g} (the run's: {own:g})")
    return out


def override_note(f: RunFolder, d: dict) -> str:
    found = overrides_of(d.get("model"), get(f.config.data, "model", "memory") if f.config is not None else None)
    if not found:
        return ""
    return f'<p class="warn">measured with {esc(", ".join(found))}: not the run\'s own settings</p>'


# --- sections ----------------------------------------------------------------------------------------
def size_table(folders: list[RunFolder]) -> str:
    """Configuration and size of every run: one column per run."""
    runs = [f for f in folders if f.is_run]
    if not runs:
        return ""

    def mem(c):
        m = get(c, "model", "memory") or {}
        return "none (--slots 0)" if m.get("slots") == 0 else f"{m.get('kind', '?')}, {fmt(m.get('slots'))} slots"

    rows = [
        ("memory", lambda f, c: esc(mem(c))),
        ("model", lambda f, c: esc(f"{fmt(get(c, 'model', 'n_layer'))} layer(s) x {fmt(get(c, 'model', 'n_head'))} heads, "
                                 f"width {fmt(get(c, 'model', 'n_embd'))}, block {fmt(get(c, 'model', 'block_size'))} bytes")),
        ("parameters", lambda f, c: val(CONFIG, ["summary", "params"], get(c, "summary", "params"))),
        ("memory parameters (share)", lambda f, c: val(CONFIG, ["summary", "memory_params"], get(c, "summary", "memory_params"))
         + (f" ({100 * get(c, 'summary', 'memory_share'):.1f}%)" if is_number(get(c, "summary", "memory_share")) else "")),
        ("steps trained", lambda f, c: val(CONFIG, ["summary", "step"], get(c, "summary", "step"))
         + " of " + val(CONFIG, ["train", "iters"], get(c, "train", "iters"))),
        ("segments per step (batch)", lambda f, c: val(CONFIG, ["train", "batch_size"], get(c, "train", "batch_size"))),
        ("recall curriculum share", lambda f, c: val(CONFIG, ["train", "curriculum"], get(c, "train", "curriculum"))),
        ("training data", lambda f, c: esc(get(c, "train", "data") or "embedded Shakespeare corpus")),
        ("final train loss (nats/byte)", lambda f, c: val(CONFIG, ["summary", "train_loss"], get(c, "summary", "train_loss"))),
        ("<b>validation loss, memory carried</b>", lambda f, c: "<b>" + val(CONFIG, ["summary", "val_loss"], get(c, "summary", "val_loss")) + "</b>"),
        ('validation loss, memory read ablated <span class="tag">control</span>',
         lambda f, c: val(CONFIG, ["summary", "val_loss_ablated"], get(c, "summary", "val_loss_ablated"))),
        ("ablated minus carried (what the memory's read gains)", lambda f, c: _diff(get(c, "summary", "val_loss_ablated"), get(c, "summary", "val_loss"))),
        ("synthetic-fact answer bytes right, memory / ablated",
         lambda f, c: val(CONFIG, ["summary", "recall_acc"], get(c, "summary", "recall_acc")) + " / "
         + val(CONFIG, ["summary", "recall_acc_ablated"], get(c, "summary", "recall_acc_ablated"))),
        ("training tokens/s", lambda f, c: val(CONFIG, ["summary", "tokens_per_s"], get(c, "summary", "tokens_per_s"))),
        ("NaN/inf seen", lambda f, c: val(CONFIG, ["summary", "nonfinite"], get(c, "summary", "nonfinite"))),
    ]
    head = "".join(f"<th>{esc(f.shown)}</th>" for f in runs)
    body = "".join(f"<tr><th>{name}</th>" + "".join(f'<td class="num" data-run="{esc(f.shown)}">{fn(f, f.config.data)}</td>' for f in runs) + "</tr>"
                   for name, fn in rows)
    full = "".join(f'<div class="col" data-run="{esc(f.shown)}"><h4>{esc(f.shown)}</h4>{render_dict(CONFIG, [], f.config.data, 0, skip={"summary"})}</div>' for f in runs)
    return (f'<div class="scroll"><table class="data wide"><thead><tr><th></th>{head}</tr></thead><tbody>{body}</tbody></table></div>'
            f'<details><summary>every setting of config.json</summary><div class="cols" style="--n:{len(runs)}">{full}</div></details>')


def _diff(a: Any, b: Any) -> str:
    if not (is_number(a) and is_number(b)):
        return "–"
    return esc(f"{a - b:+.3f}")


def training_column(f: RunFolder) -> str:
    if f.config is None:
        return not_run("not a run folder (no config.json): " + ("a sweep, see below" if f.sweep else "results only, see below"))
    if f.config.error:
        return f'<p class="warn">{CONFIG} is {esc(f.config.error)}</p>'
    parts = [image(f, "loss.png")]
    evals = [(i, r) for i, r in enumerate(f.metrics) if "val_loss" in r]
    if not f.metrics:
        parts.append('<p class="na">no metrics.jsonl rows</p>')
    else:
        last_i, last = len(f.metrics) - 1, f.metrics[-1]
        if not evals or evals[-1][0] != last_i:
            evals.append((last_i, last))
        keys = [k for k in ("step", "loss", "val_loss", "val_loss_ablated", "recall_acc", "recall_acc_ablated", "lr", "tokens_per_s")
                if any(k in r for _, r in evals)]
        keys += [k for _, r in evals for k in r if k not in keys and is_scalar(r[k])]
        keys = list(dict.fromkeys(keys))
        ctl = ' class="control"'
        head = "".join(f"<th{ctl if k.endswith('_ablated') else ''}>{esc(label(k))}</th>" for k in keys)
        body = "".join("<tr>" + "".join(f'<td class="num">{val(METRICS, [i, k], r.get(k)) if k in r else ""}</td>' for k in keys) + "</tr>"
                       for i, r in evals[:MAX_ROWS])
        parts.append(f"<p>{len(f.metrics):,} rows in {METRICS}; the evaluations (and the last step):</p>"
                     + fold(f"{len(evals)} evaluations", f'<div class="scroll"><table class="data"><thead><tr>{head}</tr></thead>'
                            f"<tbody>{body}</tbody></table></div>", len(evals)))
    return "".join(parts)


def store_verdict(d: dict) -> tuple[str, str]:
    """What the controls say of the pattern similarity (the figure alone means little)."""
    m, o = d.get("mean"), get(d, "controls", "other_sequence", "mean")
    if not is_number(m):
        return "pattern similarity undefined (nothing written yet)", "neutral"
    if not is_number(o):
        return f"pattern similarity {m:.3f}, with no other-sequence control to compare it with", "neutral"
    if m - o < 0.01:
        return (f"no storage shown: the slots are as close to another sequence ({o:.3f}) as to the one they saw "
                f"({m:.3f}); the figure measures a direction shared by all hidden states"), "bad"
    return f"the slots are closer to what they saw ({m:.3f}) than to another sequence ({o:.3f}): {m - o:+.3f}", "good"


def usage_verdict(d: dict) -> tuple[str, str]:
    dead, ent = d.get("dead_slots"), d.get("entropy")
    if not is_number(ent):
        return "usage undefined (nothing read)", "neutral"
    if isinstance(dead, list) and dead:
        return f"{len(dead)} dead slot(s) ({_slots(dead)}); entropy of slot means {ent:.3f} (1 = even)", "bad"
    per = get(d, "per_sequence", "entropy_mean")
    tail = f", per sequence {per:.3f}" if is_number(per) else ""
    return f"every slot is read; entropy of slot means {ent:.3f} (1 = even){tail}", "good" if ent >= 0.9 else "neutral"


def _slots(xs: Any) -> str:
    if not isinstance(xs, list) or not xs:
        return "none"
    return ("slot " if len(xs) == 1 else "slots ") + ", ".join(map(str, xs))


def verdict_kind(text: str) -> str:
    t = text.lower()
    if t.startswith("no ") or "no recall" in t:
        return "bad"
    if t.startswith("partial"):
        return "neutral"
    return "good"


def headline(exp: Experiment, d: dict) -> tuple[str, set]:
    """The experiment's main table, the measured figure and its controls in one table; the keys it shows."""
    src = exp.json
    if exp.name == "store":
        rows = [("pattern similarity s_t (mean over slots), mean ± std over sequences", None, pm(src, d, [])),
                ("control: slots vs another sequence", "control", pm(src, d, ["controls", "other_sequence"])),
                ("control: random unit vectors", "control", pm(src, d, ["controls", "random"])),
                ("control: memory in its initial state", "control", pm(src, d, ["controls", "initial"])),
                ("best slot, mean", None, val(src, ["best_slot_mean"], d.get("best_slot_mean"))),
                ("s_t min / max", None, val(src, ["min"], d.get("min")) + " / " + val(src, ["max"], d.get("max"))),
                ("trend: first → last window", None, val(src, ["trend", "first"], get(d, "trend", "first")) + " → "
                 + val(src, ["trend", "last"], get(d, "trend", "last"))),
                ("slot-to-slot cosine (1 = identical slots)", None, val(src, ["slot_cosine"], d.get("slot_cosine"))),
                ("NaN/inf seen", None, val(src, ["nonfinite"], d.get("nonfinite")))]
        keys = {"mean", "std", "min", "max", "best_slot_mean", "trend", "slot_cosine", "nonfinite", "verdict", "notes"}
    elif exp.name == "usage":
        rows = [("mean usage per slot", None, "1.000 by construction"),
                ("normalised entropy of slot means (1 = even)", None, val(src, ["entropy"], d.get("entropy"))),
                ("min/max ratio of slot means (1 = even)", None, val(src, ["min_max_ratio"], d.get("min_max_ratio"))),
                ("coefficient of variation (0 = even)", None, val(src, ["cv"], d.get("cv"))),
                ("per sequence: entropy / min-max / cv (means)", None,
                 " / ".join(val(src, ["per_sequence", k], get(d, "per_sequence", k)) for k in ("entropy_mean", "min_max_ratio_mean", "cv_mean"))),
                ("dead slots (mean usage < 0.1)", None, esc(_slots(d.get("dead_slots")))),
                ("dominant slots (mean usage > 3)", None, esc(_slots(d.get("dominant_slots")))),
                ("NaN/inf seen", None, val(src, ["nonfinite"], d.get("nonfinite")))]
        for i, g in enumerate(d.get("gates") or []):
            if isinstance(g, dict):
                rows.append((f"read gate, block {fmt(g.get('layer'))}: mean ± std", None, pm(src, d, ["gates", i])))
        keys = {"entropy", "min_max_ratio", "cv", "dead_slots", "dominant_slots", "nonfinite", "gates", "verdict", "notes"}
    elif exp.name == "recall":
        ci = d.get("context_influence") if isinstance(d.get("context_influence"), dict) else {}
        table = condition_table(src, ["summary"], d["summary"]) if isinstance(d.get("summary"), dict) else None
        kl = ""
        if ci:
            kl = ("<p>context influence, KL(read on ‖ read off): " + val(src, ["context_influence", "mean_kl_rest"], ci.get("mean_kl_rest"))
                  + " nats/byte on the facts' rests, " + val(src, ["context_influence", "mean_kl_prompt"], ci.get("mean_kl_prompt"))
                  + " on the prompts</p>")
        facts = d.get("facts")
        per = ""
        if isinstance(facts, list) and facts and all(isinstance(x, dict) for x in facts):
            per = (f"<details><summary>per fact ({len(facts)}): cue, expected, generated with the memory and with a fresh memory"
                   f"</summary>{rows_table(src, ['facts'], facts)}</details>")
        return (table or "") + kl + per, {"summary", "verdict", "context_influence", "facts"}
    elif exp.name == "needle":
        table = condition_table(src, ["conditions"], d["conditions"]) if isinstance(d.get("conditions"), dict) else None
        s = d.get("settings") if isinstance(d.get("settings"), dict) else {}
        line = ""
        if s:
            line = (f"<p>{esc(fmt(s.get('facts')))} facts, each written once in a haystack of {esc(fmt(s.get('length')))} bytes at depth "
                    f"{esc(fmt(s.get('depth')))}; {esc(fmt(s.get('trials')))} haystack draws (mean ± std)</p>")
        return line + (table or "") + needle_facts(d.get("facts")), {"conditions", "verdict", "facts"}
    else:
        return "", set()
    body = "".join(f'<tr{row_class(k) if k else ""}><th>{esc(name)}</th><td class="num">{cell}</td></tr>' for name, k, cell in rows)
    return f'<table class="kv"><tbody>{body}</tbody></table>', keys


def needle_facts(facts: Any) -> str:
    """Per fact (first haystack draw): cue, expected rest, and what each condition generated (✓ exact)."""
    if not isinstance(facts, list) or not facts or not all(isinstance(x, dict) and isinstance(x.get("conditions"), dict) for x in facts):
        return ""
    conds = list(facts[0]["conditions"])
    head = "<th>cue</th><th>expected</th>" + "".join(f"<th{row_class(c)}>{esc(cond_label(c))}</th>" for c in conds)
    body = []
    for x in facts[:MAX_ROWS]:
        cells = []
        for c in conds:
            g = x["conditions"].get(c) if isinstance(x["conditions"].get(c), dict) else {}
            mark = {True: " ✓", False: " ✗"}.get(g.get("exact"), "")
            cells.append(f'<td class="txt">{esc(repr(g.get("generated", ""))[1:-1])}{mark}</td>')
        body.append(f"<tr><td>{esc(x.get('cue', ''))}</td><td>{esc(x.get('expected', ''))}</td>{''.join(cells)}</tr>")
    return (f"<details><summary>per fact ({len(facts)}, first haystack draw): what each condition generated (✓ exact)</summary>"
            f'<div class="scroll"><table class="data"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div></details>')


META = {"run", "files", "seconds", "facts_file"}  # shown in the column's header line, not as figures


def experiment_column(exp: Experiment, f: RunFolder) -> str:
    if not f.is_run:
        return not_run("not a run folder")
    doc = f.results.get(exp.json)
    if doc is None:
        if not f.has_memory:
            return not_run(f"not applicable: this run has no memory (--slots 0), {exp.name} measures the memory")
        block = get(f.config.data, "model", "block_size")
        hint = ""
        if "--facts" in exp.command and isinstance(block, int) and block < 128:
            hint = (f" (this model's {block}-byte block holds facts of at most {block // 2 - 2} bytes; "
                    f"{DEFAULT_FACTS} needs --block-size 128: pass a file of shorter facts)")
        return not_run(f"not run yet{hint}. Run:", command(exp, f))
    f.results.pop(exp.json)  # shown here, not again among other results
    if doc.error or not isinstance(doc.data, dict):
        return not_run(f"{exp.json} is {doc.error or 'not a JSON object'}; run it again:", command(exp, f))
    d = doc.data
    if "verdict" in d and isinstance(d["verdict"], str) and d["verdict"]:
        v = verdict_box(d["verdict"], verdict_kind(d["verdict"]))
    elif exp.name == "store":
        v = verdict_box(*store_verdict(d))
    elif exp.name == "usage":
        v = verdict_box(*usage_verdict(d))
    else:
        v = ""
    head, keys = headline(exp, d)
    keys = keys | {"notes"}  # shown as notes under the table
    meta = []
    if d.get("facts_file"):
        meta.append(f"facts: {esc(d['facts_file'])}")
    if is_number(d.get("seconds")):
        meta.append(f"{d['seconds']:.1f} s")
    meta_line = f'<p class="meta">{" · ".join(meta)}</p>' if meta else ""
    plots = "".join(image(f, n) for n in plots_of(f, d, exp.plots))
    new, new_keys = _new_sections(exp, d, keys)
    rest = render_dict(exp.json, [], d, 0, skip=keys | META | new_keys)
    rest_html = f'<details class="all"><summary>every other figure of {esc(exp.json)}</summary>{rest}</details>' if rest else ""
    return v + stale_note(f, doc) + override_note(f, d) + meta_line + head + notes_list(d.get("notes")) + plots + new + rest_html


def _new_sections(exp: Experiment, d: dict, keys: set) -> tuple[str, set]:
    """Sections of a result this page has no layout for (e.g. needle's placements, distance, document), shown open."""
    known = {"store": {"run", "source", "sequences", "block_size", "seed", "random_tokens", "memory", "per_sequence",
                       "per_sequence_std", "best_slot", "empty_slots", "slot_cosine_matrix", "slot_cosine_per_sequence",
                       "controls", "nonfinite_where"},
             "usage": {"run", "source", "sequences", "block_size", "seed", "random_tokens", "memory", "usage", "slot_mean",
                       "slot_min", "slot_max", "row_mean", "per_sequence", "read_mass", "local_mass", "writes", "undefined_rows"},
             "recall": {"settings", "model", "facts", "extra"},
             "needle": {"settings", "model", "facts", "per_trial"}}.get(exp.name, set())
    out, shown = [], set()
    for k, v in d.items():
        if k in keys or k in META or k in known or is_scalar(v) or not v:
            continue
        shown.add(k)
        out.append(f'<h4>{esc(label(k))}</h4>{render(exp.json, [k], v, 1)}')
    return "".join(out), shown


def sweep_column(f: RunFolder) -> str:
    if not f.sweep:
        return not_run("no sweep in this folder; a sweep trains its own grid of runs:",
                       "imm sweep --slots 4,8 --memory-lr 0.04,0.2 --iters 100 --out runs/sweep\nimm report runs/sweep")
    lines = [i for i, r in enumerate(f.sweep) if isinstance(r.get("figures"), dict)]
    recs = [f.sweep[i] for i in lines]
    rows = [{"point": r.get("name"), **r["figures"]} for r in recs]
    table = rows_table(SWEEP_JSONL, [], rows, keypath=lambda i, k: [lines[i], *(["name"] if k == ("point",) else ["figures", *k])])
    plots = "".join(image(f, n) for n in ("optimal_config_results.png",) if n in f.pngs)
    notes = [f"{r.get('name')}: {n}" for r in recs for n in (r.get("notes") or [])]
    return f"<p>{len(recs)} points (one line each in {SWEEP_JSONL}; control columns: *_ablated, *_fresh, *_initial)</p>" + table + notes_list(notes) + plots


def other_results(f: RunFolder, names: set | None = None) -> str:
    """Result files with no layout of their own (or only `names`), rendered generically; they leave f.results."""
    parts = []
    for name in [n for n in f.results if names is None or n in names]:
        doc = f.results.pop(name)
        if doc.error or doc.data is None:
            parts.append(f'<p class="warn">{esc(name)} is {esc(doc.error or "empty")}</p>')
            continue
        d = doc.data
        v = verdict_box(d["verdict"], verdict_kind(d["verdict"])) if isinstance(d, dict) and isinstance(d.get("verdict"), str) else ""
        body = render_dict(name, [], d, 0, skip={"verdict", "files"}) if isinstance(d, dict) else render(name, [], d)
        plots = "".join(image(f, n) for n in plots_of(f, d, ()))
        parts.append(f"<h4>{esc(name)}</h4>{v}{body}{plots}")
    return "".join(parts)


# --- the page ------------------------------------------------------------------------------------------
GENERATOR = '<meta name="generator" content="imm report">'  # marks a file `imm report` may replace


def is_report(path: Path) -> bool:
    """True if `path` is a page this command wrote (so writing it again loses nothing of the user's)."""
    try:
        with open(path, "rb") as fh:
            return GENERATOR.encode() in fh.read(4096)
    except OSError:
        return False


CSS = """
:root{--fg:#1d232a;--mut:#5b6570;--line:#d8dde3;--bg:#fff;--alt:#f5f7f9;--good:#e6f4ea;--bad:#fdecea;--neu:#fff8e1;--ctl:#6b5b95}
*{box-sizing:border-box}body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:var(--fg);background:var(--bg);margin:0}
header{padding:18px 28px;border-bottom:1px solid var(--line);background:var(--alt)}header h1{margin:0 0 4px;font-size:22px}
header p{margin:2px 0;color:var(--mut)}nav{padding:8px 28px;border-bottom:1px solid var(--line);position:sticky;top:0;background:var(--bg);z-index:2}
nav a{margin-right:14px;color:#2457a6;text-decoration:none}main{padding:8px 28px 40px}section{margin:22px 0 30px}
h2{font-size:18px;border-bottom:2px solid var(--line);padding-bottom:4px}h3{font-size:15px;margin:4px 0 8px;word-break:break-all}
h4{font-size:14px;margin:14px 0 6px}h5{font-size:13px;margin:10px 0 4px;color:var(--mut)}
p.what{color:var(--mut);margin-top:-4px;max-width:70em}.cols{display:grid;grid-template-columns:repeat(var(--n),minmax(360px,1fr));gap:18px;overflow-x:auto}
.col{min-width:0;border:1px solid var(--line);border-radius:6px;padding:10px 12px;background:var(--bg)}
table{border-collapse:collapse;margin:6px 0 10px;font-variant-numeric:tabular-nums}th,td{border:1px solid var(--line);padding:3px 7px;text-align:left;vertical-align:top}
thead th{background:var(--alt)}td.num{text-align:right;white-space:nowrap}table.kv th{font-weight:normal}
tr.control th,tr.control td,th.control{color:var(--ctl);background:#f7f5fb}tr.bound th,tr.bound td,th.bound{color:#55606b;background:#f3f6f3}
.tag{font-size:11px;border:1px solid var(--ctl);color:var(--ctl);border-radius:3px;padding:0 3px;margin-left:4px}.tag.bound{border-color:#55606b;color:#55606b}
.verdict{padding:8px 10px;border-radius:5px;margin:6px 0 10px;background:var(--neu)}.verdict.good{background:var(--good)}.verdict.bad{background:var(--bad)}
.missing{padding:10px;border:1px dashed #b9c2cc;border-radius:5px;color:var(--mut);background:var(--alt)}
pre{background:#f0f2f4;padding:6px 8px;border-radius:4px;overflow-x:auto;white-space:pre-wrap}pre.cmd{color:var(--fg);margin:6px 0 0}
figure{margin:10px 0}figure img{max-width:100%;height:auto;border:1px solid var(--line)}figcaption{font-size:12px;color:var(--mut)}
.warn{color:#a04000}.na{color:var(--mut)}.meta{color:var(--mut);font-size:12px}.series{font-size:12px;word-break:break-all}
.scroll{overflow-x:auto}details{margin:6px 0}summary{cursor:pointer;color:#2457a6}ul.notes{color:#6a4e00;padding-left:18px}
footer{color:var(--mut);padding:10px 28px 30px;border-top:1px solid var(--line)}
"""


def _section(sid: str, title: str, what: str, columns: list[str], folders: list[RunFolder]) -> str:
    cols = "".join(f'<div class="col" data-run="{esc(f.shown)}"><h3>{esc(f.shown)}</h3>{c}</div>' for f, c in zip(folders, columns))
    w = f'<p class="what">{esc(what)}</p>' if what else ""
    return f'<section id="{sid}"><h2>{esc(title)}</h2>{w}<div class="cols" style="--n:{len(folders)}">{cols}</div></section>'


def build_report(paths: list[Path], shown: list[str] | None = None, generated_by: str | None = None) -> str:
    """The HTML page of these run (or sweep) folders, side by side. InputError if one is not a folder imm made."""
    if not paths:
        raise InputError("name at least one run folder")
    folders = [read_folder(Path(p)) for p in paths]
    for f, s in zip(folders, shown or [str(p) for p in paths]):
        f.shown = s
    sections = []
    nav = []

    def add(sid: str, title: str, html_: str):
        nav.append(f'<a href="#{sid}">{esc(title)}</a>')
        sections.append(html_)

    if any(f.is_run for f in folders):
        add("run", "Run", f'<section id="run"><h2>Run: configuration and size</h2><p class="what">'
                          f'{esc("Validation loss is measured on the held-out last 10% of the corpus; with the memory read ablated the model is the same GPT without its memory (the control).")}'
                          f"</p>{size_table(folders)}</section>")
        add("training", "Training", _section("training", "Training curve", CAPTIONS["loss.png"],
                                             [training_column(f) for f in folders], folders))
        for exp in EXPERIMENTS:
            add(exp.name, exp.name, _section(exp.name, exp.title, exp.measures, [experiment_column(exp, f) for f in folders], folders))
    if any(f.sweep for f in folders):
        add("sweep", "sweep", _section("sweep", "Sweep (imm sweep)", "a grid of short trainings, each point measured by store, usage and needle; "
                                       "the control figures sit in the columns beside each figure",
                                       [sweep_column(f) for f in folders], folders))
    if any(COMPARE_JSON in f.results for f in folders):
        cols = [other_results(f, {COMPARE_JSON}) or '<p class="na">no compare.json in this folder</p>' for f in folders]
        add("compare", "compare", _section("compare", "Comparison of runs (imm compare)", "several runs side by side, "
                                           "each figure with its controls (fresh memory, other facts, slots 0 baseline)", cols, folders))
    others = [other_results(f) for f in folders]
    if any(others):
        add("other", "other results", _section("other", "Other results in the folder", "result files this page has no special layout for",
                                               [o or '<p class="na">none</p>' for o in others], folders))
    extra = [[image(f, n) for n in f.pngs if n not in f.claimed] for f in folders]
    if any(any(x) for x in extra):
        add("figures", "other figures", _section("figures", "Other figures in the folder", "", ["".join(x) or '<p class="na">none</p>' for x in extra], folders))
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    names = ", ".join(f.shown for f in folders)
    try:
        from importlib.metadata import version

        ver = version("imm")
    except Exception:  # noqa: BLE001 - not installed (run from a checkout)
        ver = "?"
    by = f" by <code>{esc(generated_by)}</code>" if generated_by else ""
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">{GENERATOR}<meta name="viewport" content="width=device-width,initial-scale=1">'
            f"<title>imm report: {esc(names)}</title><style>{CSS}</style></head><body>"
            f"<header><h1>imm report</h1><p>{len(folders)} folder{'s' if len(folders) > 1 else ''}: {esc(names)}</p>"
            f"<p>made {esc(now)}{by} (imm {esc(ver)}); every figure comes from the folder's files, controls beside it</p></header>"
            f"<nav>{''.join(nav)}</nav><main>{''.join(sections)}</main>"
            f"<footer>Self-contained page: images are embedded; nothing is loaded from the network. "
            f"Figures carry <code>data-key=\"FILE:PATH\"</code> naming where they come from.</footer></body></html>")
