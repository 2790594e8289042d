"""`imm report`: the page of a tiny run, built through the real CLI and rendered in headless Chromium.

The browser test trains a tiny run, runs store, usage, recall and needle on it, writes the report of
that run beside a copy with no experiments, and loads the page in Chromium over its DevTools
protocol: no console error, no request other than the file itself and data: URIs, every <img>
decodes with a non-zero size, every number on the page equals the figure of the JSON file it names
(data-key="FILE:PATH"), and the copy shows the commands that run the missing experiments.
Without Chromium (or websocket-client) it is skipped with the reason; IMM_REQUIRE_BROWSER=1 (set
by .ci/run) turns that skip into a failure.
"""

from __future__ import annotations

import base64
import json
import os
import shlex
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import TINY
from imm_cli.report import build_report

FACTS = "Zorv was 1873.\nTenn has 42.\nMirel is red.\n"  # short enough for a 32-byte block
EXPERIMENTS = [  # every experiment of the main job, sized for a tiny model
    ["store", "--sequences", "3"],
    ["usage", "--sequences", "3"],
    ["recall", "--context", "8"],
    ["needle", "--context", "8", "--trials", "1", "--length", "64", "--lengths", "64", "--depths", "0,1"],
]
NEEDLE_SWEEPS = {"--capacity": "1,2", "--distance": "64,128", "--document": "2,3", "--spacing": "64"}  # where needle has them
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-extensions", "--remote-debugging-port=0", "--window-size=1400,1000"]


def chromium() -> str | None:
    for c in (os.environ.get("IMM_CHROMIUM"), "chromium", "chromium-browser", "google-chrome", "/usr/bin/chromium"):
        if c and shutil.which(c):
            return shutil.which(c)
    return None


def skip_or_fail(reason: str) -> None:
    if os.environ.get("IMM_REQUIRE_BROWSER"):
        pytest.fail(f"IMM_REQUIRE_BROWSER is set but {reason}")
    pytest.skip(reason)


# --- a tiny run with every experiment, through the real CLI -------------------------------------
@pytest.fixture
def reported(imm, tmp_path) -> tuple[Path, Path, Path]:
    """(run with every experiment, copy of it with none, the report of both)."""
    run = tmp_path / "run"
    r = imm("train", *TINY, "--iters", "3", "--out", str(run))
    assert r.code == 0, r.stderr
    facts = tmp_path / "facts.txt"
    facts.write_text(FACTS)
    bare = tmp_path / "bare"
    shutil.copytree(run, bare)
    needle_help = imm("needle", "--help").stdout
    for cmd, *flags in EXPERIMENTS:
        extra = ["--facts", str(facts)] if cmd in ("recall", "needle") else []
        if cmd == "needle":  # the sweeps' flags, sized for a tiny model, as far as this needle has them
            extra += [x for flag, v in NEEDLE_SWEEPS.items() if f"{flag} " in needle_help for x in (flag, v)]
        r = imm(cmd, "--run", str(run), *extra, *flags)
        assert r.code == 0, f"imm {cmd}: {r.stderr[-2000:]}"
    out = tmp_path / "report.html"
    r = imm("report", str(run), str(bare), "--out", str(out), "--json")
    assert r.code == 0, r.stderr
    assert json.loads(r.stdout) == {"report": str(out)}
    return run, bare, out


# --- Chromium over the DevTools protocol ------------------------------------------------------------
class Browser:
    """Headless Chromium with a fresh profile; one page, driven over CDP (websocket-client)."""

    def __init__(self, exe: str, profile: Path):
        import websocket

        self.log = open(profile.parent / "chromium.log", "wb")
        self.proc = subprocess.Popen([exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 180  # generous: a loaded 2-core CI machine starts Chromium slowly
        while not (port_file.is_file() and port_file.read_text().strip()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"Chromium did not start: {(profile.parent / 'chromium.log').read_text(errors='replace')[-1500:]}")
            time.sleep(0.1)
        port = port_file.read_text().split()[0]
        no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        for _ in range(100):
            targets = json.loads(no_proxy.open(f"http://127.0.0.1:{port}/json/list", timeout=60).read())
            pages = [t for t in targets if t.get("type") == "page"]
            if pages:
                break
            time.sleep(0.1)
        self.ws = websocket.create_connection(pages[0]["webSocketDebuggerUrl"], timeout=180,
                                              http_no_proxy=["127.0.0.1", "localhost"], suppress_origin=True)
        self.next_id = 0
        self.events: list[dict] = []

    def call(self, method: str, **params) -> dict:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            if "method" in msg:
                self.events.append(msg)

    def wait_for(self, event: str, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while not any(e["method"] == event for e in self.events):
            if time.monotonic() > deadline:
                raise TimeoutError(event)
            self.events.append(json.loads(self.ws.recv()))

    def evaluate(self, js: str):
        r = self.call("Runtime.evaluate", expression=js, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"page script failed: {r['exceptionDetails']}")
        return r["result"].get("value")

    def close(self) -> None:
        try:
            self.ws.close()
        except Exception:  # noqa: BLE001
            pass
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


PAGE_FACTS = """(async () => {
  const imgs = [...document.images];
  await Promise.all(imgs.map(i => i.decode().catch(() => null)));
  const ext = [...document.querySelectorAll('[src],[href]')]
      .map(e => e.getAttribute('src') || e.getAttribute('href'))
      .filter(u => !u.startsWith('data:') && !u.startsWith('#'));
  return {
    title: document.title,
    sections: [...document.querySelectorAll('section')].map(s => s.id),
    scripts: document.scripts.length,
    external: ext,
    images: imgs.map(i => ({file: i.dataset.file, run: i.closest('[data-run]')?.dataset.run,
                            w: i.naturalWidth, h: i.naturalHeight, complete: i.complete})),
    values: [...document.querySelectorAll('[data-key]')].map(e => ({key: e.dataset.key, text: e.textContent,
                            run: e.closest('[data-run]')?.dataset.run})),
    missing: [...document.querySelectorAll('.missing')].map(e => ({run: e.closest('[data-run]')?.dataset.run,
                            text: e.textContent, cmd: e.querySelector('pre.cmd')?.textContent})),
    height: document.documentElement.scrollHeight,
  };
})()"""


def json_value(folder: Path, key: str):
    """The figure a data-key names: FILE:PATH, PATH dotted, list indices as numbers."""
    name, _, path = key.partition(":")
    if name.endswith(".jsonl"):
        doc = [json.loads(line) for line in (folder / name).read_text().splitlines() if line.strip()]
    else:
        doc = json.loads((folder / name).read_text())
    for p in path.split(".") if path else []:
        doc = doc[int(p)] if isinstance(doc, list) else doc[p]
    return doc


def _leaves(v):
    if isinstance(v, dict):
        for x in v.values():
            yield from _leaves(x)
    elif isinstance(v, list):
        for x in v:
            yield from _leaves(x)
    else:
        yield v


def same(text: str, v) -> bool:
    """The page's text of a JSON value: numbers rounded as shown, bools yes/no, null a dash."""
    if v is None:
        return text == "–"
    if isinstance(v, bool):
        return text == ("yes" if v else "no")
    shown = float(text.replace(",", ""))
    return abs(shown - v) <= max(5e-4, 5e-3 * abs(v))


def test_report_in_headless_chromium(reported, tmp_path):
    exe = chromium()
    if exe is None:
        skip_or_fail("headless Chromium is not installed (Debian/Ubuntu: apt-get install chromium; or set IMM_CHROMIUM)")
    try:
        import websocket  # noqa: F401
    except ImportError:
        skip_or_fail("websocket-client is not installed (pip install -e '.[test]')")
    run, bare, page = reported
    folders = {str(run): run, str(bare): bare}
    profile = tmp_path / "profile"
    profile.mkdir()
    b = Browser(exe, profile)
    try:
        for domain in ("Runtime", "Log", "Page", "Network"):
            b.call(f"{domain}.enable")
        b.call("Page.navigate", url=page.resolve().as_uri())
        b.wait_for("Page.loadEventFired")
        facts = b.evaluate(PAGE_FACTS)
        b.call("Emulation.setDeviceMetricsOverride", width=1400, height=min(int(facts["height"]), 16000),
               deviceScaleFactor=1, mobile=False)
        shot = base64.b64decode(b.call("Page.captureScreenshot", format="png")["data"])
    finally:
        b.close()
    (tmp_path / "report.png").write_bytes(shot)
    if os.environ.get("IMM_REPORT_SCREENSHOT"):  # keep it (e.g. to look at it)
        Path(os.environ["IMM_REPORT_SCREENSHOT"]).write_bytes(shot)
    assert shot[:8] == b"\x89PNG\r\n\x1a\n" and len(shot) > 50_000

    # no console error, no exception, no request but the file itself and data: URIs
    errors = [e for e in b.events if e["method"] == "Runtime.exceptionThrown"
              or (e["method"] == "Runtime.consoleAPICalled" and e["params"]["type"] in ("error", "assert"))
              or (e["method"] == "Log.entryAdded" and e["params"]["entry"]["level"] == "error")]
    assert not errors, errors
    urls = [e["params"]["request"]["url"] for e in b.events if e["method"] == "Network.requestWillBeSent"]
    assert all(u.startswith(("file:", "data:")) for u in urls), urls
    assert facts["scripts"] == 0 and facts["external"] == []
    assert {"run", "training", "store", "usage", "recall", "needle"} <= set(facts["sections"])

    # every image decodes; every figure the experiments drew is there
    assert all(i["complete"] and i["w"] > 0 and i["h"] > 0 for i in facts["images"]), facts["images"]
    shown = {i["file"] for i in facts["images"] if i["run"] == str(run)}
    assert {"loss.png", "pattern_similarity.png", "slot_usage_heatmap.png", "optimal_config_results.png",
            "context_influence.png", "needle_heatmap.png", "capacity.png"} <= shown
    assert {p.name for p in run.glob("*.png")} <= shown

    # every number on the page is the figure of the file it names; the main ones are all there
    for v in facts["values"]:
        assert v.get("run") in folders, v  # every figure sits in its run's column (or cell)
        assert same(v["text"], json_value(folders[v["run"]], v["key"])), v
    keys = {v["key"] for v in facts["values"] if v["run"] == str(run)}
    needle = json.loads((run / "needle.json").read_text())
    recall = json.loads((run / "recall.json").read_text())
    expected = {f"config.json:summary.{k}" for k in ("params", "val_loss", "val_loss_ablated")}
    expected |= {f"needle.json:conditions.{c}.{m}" for c in needle["conditions"] for m in needle["conditions"][c]}
    expected |= {f"recall.json:summary.{c}.{m}" for c in recall["summary"] for m in recall["summary"][c]}
    expected |= {"store.json:mean", "store.json:std", "store.json:controls.random.mean", "store.json:controls.other_sequence.mean",
                 "usage.json:entropy", "usage.json:cv", "usage.json:min_max_ratio", "usage.json:gates.0.mean"}
    assert expected <= keys, sorted(expected - keys)
    for name in ("needle.json", "recall.json", "store.json", "usage.json"):  # every section of every result is on the page
        doc = json.loads((run / name).read_text())
        sections = [k for k, v in doc.items() if isinstance(v, dict) and k not in ("files", "settings", "model", "memory", "extra")
                    and any(isinstance(x, (int, float)) and not isinstance(x, bool) for x in _leaves(v))]
        missing = [k for k in sections if not any(key.startswith(f"{name}:{k}.") for key in keys)]
        assert not missing, (name, missing)

    # the copy without experiments: a note per experiment with the command that runs it
    notes = {m["cmd"].split()[1]: m for m in facts["missing"] if m["run"] == str(bare) and m["cmd"]}
    assert set(notes) == {"store", "usage", "recall", "needle"}
    assert notes["store"]["cmd"] == f"imm store --run {shlex.quote(str(bare))}"
    assert all("not run yet" in m["text"] for m in notes.values())


# --- the page without a browser -----------------------------------------------------------------------
def test_report_escapes_text_and_shows_new_results(run_copy):
    """Text from files is escaped; a needle.json with keys the page does not know shows them as tables."""
    (run_copy / "needle.json").write_text(json.dumps({
        "verdict": "<script>alert(1)</script> & more",
        "conditions": {"memory": {"exact_match": 0.9, "exact_match_std": 0.1}, "fresh": {"exact_match": 0.0, "exact_match_std": 0.0}},
        "facts": [{"cue": "<b>Zorv</b>", "expected": " was", "conditions": {"memory": {"generated": "<img src=x>", "exact": False}}}],
        "placements": {"inline": {"memory": {"exact_match": 0.75}, "fresh": {"exact_match": 0.05}}},
        "distance": {"distances": [1024, 65536], "memory": [0.8, 0.1], "fresh": [0.0, 0.0]},
        "document": {"n_facts": [1, 8], "exact_match": [0.9, 0.4]},
    }))
    page = build_report([run_copy])
    assert "<script" not in page and "<img src=x>" not in page and "<b>Zorv" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; more" in page
    for key in ("needle.json:placements.inline.memory.exact_match", "needle.json:placements.inline.fresh.exact_match",
                "needle.json:distance.memory.1", "needle.json:distance.distances.1", "needle.json:document.exact_match.1"):
        assert f'data-key="{key}"' in page, key
    assert "http://" not in page and "https://" not in page
    # the experiments not run: their commands, quoted for the shell
    assert f"imm store --run {shlex.quote(str(run_copy))}" in page


def test_report_damaged_and_missing_results(run_copy):
    (run_copy / "store.json").write_text("{not json")
    (run_copy / "usage.json").write_text(json.dumps({"entropy": None}))  # fields missing: dashes, no crash
    (run_copy / "loss.png").write_bytes(b"not a png")
    page = build_report([run_copy])
    assert "store.json is unreadable (JSONDecodeError)" in page
    assert "loss.png is not a PNG file" in page
    assert 'data-key="usage.json:entropy"' in page


def test_report_command_errors(imm, tmp_path, tiny_run):
    for args, words in ((["report", str(tmp_path / "nope")], "does not exist"),
                        (["report", str(tmp_path)], "holds nothing imm made"),
                        (["report", str(tiny_run), "--out", str(tmp_path)], "is a folder")):
        r = imm(*args)
        assert r.code == 2 and len(r.err_lines) == 1 and words in r.stderr, (args, r.stderr)
    out = tmp_path / "sub" / "r.html"
    r = imm("report", str(tiny_run), "--out", str(out), "--json")
    assert r.code == 0 and json.loads(r.stdout) == {"report": str(out)} and out.read_text().startswith("<!DOCTYPE html>")
    assert imm("report", str(tiny_run), "--out", str(out)).code == 0  # its own page: written again
    notes = tmp_path / "notes.html"
    notes.write_text("<p>my notes</p>")
    r = imm("report", str(tiny_run), "--out", str(notes))
    assert r.code == 2 and "--force" in r.stderr and notes.read_text() == "<p>my notes</p>"
    assert imm("report", str(tiny_run), "--out", str(notes), "--force").code == 0 and "imm report" in notes.read_text()


def test_report_of_sweep_and_compare_folders(tmp_path, tiny_run):
    """A sweep folder and a compare folder (no config.json) have sections of their own, beside a run."""
    sweep, cmp_ = tmp_path / "sweep", tmp_path / "cmp"
    sweep.mkdir()
    cmp_.mkdir()
    recs = [{"name": f"s{s}", "figures": {"val_loss": 2.5 + s / 100, "needle_recall_at_1": 0.06}, "notes": []} for s in (4, 8)]
    (sweep / "sweep.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs) + '{"torn": ')
    (sweep / "sweep_settings.json").write_text("{}")
    (cmp_ / "compare.json").write_text(json.dumps({"runs": [{"name": "a", "train": {"val_loss": 1.5}}]}))
    (cmp_ / ".imm-outputs.json").write_text("{}")  # bookkeeping, not a result
    page = build_report([tiny_run, sweep, cmp_])
    assert 'id="sweep"' in page and 'id="compare"' in page
    assert 'data-key="sweep.jsonl:1.figures.val_loss"' in page and 'data-key="compare.json:runs.0.train.val_loss"' in page
    assert "imm-outputs" not in page and "sweep_settings" not in page


def test_report_and_compare_say_when_a_result_was_measured_with_overrides(run_copy, imm, tmp_path):
    """A recall.json measured with --memory-size (or --knn-lm, --knn-exact) is not the run's own figure:
    the report page and `imm compare` say so, naming the flag and the run's value; the run's own
    settings raise no such note."""
    memory = json.loads((run_copy / "config.json").read_text())["model"]["memory"]
    own = {"memory": memory["kind"], "slots": memory["slots"], "memory_size": memory["size"], "knn_lm": memory["knn_lm"]}
    recall = {"verdict": "no recall", "summary": {}, "facts": [], "model": own}
    (run_copy / "recall.json").write_text(json.dumps(recall))
    assert "not the run's own settings" not in build_report([run_copy])
    (run_copy / "recall.json").write_text(json.dumps({**recall, "model": {**own, "memory_size": 16}}))
    page = build_report([run_copy])
    assert f"measured with --memory-size 16 (the run&#x27;s: {memory['size']})" in page or \
        f"measured with --memory-size 16 (the run's: {memory['size']})" in page
    r = imm("compare", str(run_copy), "--no-run", "--no-speed", "--out", str(tmp_path / "c"), "--json")
    assert r.code == 0, r.stderr
    notes = json.loads(r.stdout)["runs"][0]["notes"]
    assert any(f"recall.json was measured with --memory-size 16 (the run's: {memory['size']})" in n for n in notes), notes
