"""Time to the first prediction after ``streamlit run app.py`` (issue 6 target: <= 10 s on CPU; issue 17, ImageNet default: <= 5 s from the page request).

Each run starts a fresh ``streamlit run app.py`` (the default model from ``data/``, default settings), opens
the app in Debian's Chromium through Playwright, and waits for the Inspect page's block map (the bars labelled
"fired"/"bypassed") for the default sample. Two kinds of run, alternated:

* ``at once``: the page is requested as soon as the port answers, while the server's start-up hook is still
  loading the default model (``app.py``): what a user who types the command and opens the page at once waits;
* ``warmed``: the page is requested once the server has printed that the default model is ready
  (``pages._shared.READY_LINE``): what every later visitor of a running server waits.

Times per run: ``server_up_s`` (launch to the port answering), ``ready_s`` (launch to the ready line),
``from_page_request_s`` (page request to the block map) and ``from_launch_s`` (launch to the block map).

Writes ``benchmarks/results/first_prediction.json`` and ``.md`` (medians over ``--runs``).

    . .venv/bin/activate && python benchmarks/first_prediction.py --runs 3
"""
from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "browser"))

from test_e2e_browser import ARGS, BLOCK_TEXTS, CHROMIUM, free_port  # noqa: E402

from skipviz.measure.clock import device_info  # noqa: E402
from skipviz.cli.bench_common import environment_markdown  # noqa: E402


def _ready_watcher(proc: subprocess.Popen) -> dict:
    """Reads the server's output in a thread; ``{"t": time}`` once the ready line appears."""
    import threading

    from pages._shared import READY_LINE

    seen: dict = {}

    def watch() -> None:
        for line in proc.stdout:
            if READY_LINE in line and "t" not in seen:
                seen["t"] = time.time()

    threading.Thread(target=watch, daemon=True).start()
    return seen


def one_run(port: int, warmed: bool) -> dict:
    from playwright.sync_api import sync_playwright

    t_launch = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", "app.py", "--server.headless", "true",
                             "--server.port", str(port), "--server.address", "127.0.0.1",
                             "--browser.gatherUsageStats", "false"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    ready = _ready_watcher(proc)
    try:
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if proc.poll() is not None or time.time() - t_launch > 120:
                    raise RuntimeError("streamlit did not start")
                time.sleep(0.05)
        t_up = time.time()
        while warmed and "t" not in ready:
            if proc.poll() is not None or time.time() - t_launch > 180:
                raise RuntimeError("the server never said the default model is ready")
            time.sleep(0.05)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 1600})
                t_request = time.time()
                page.goto(f"http://127.0.0.1:{port}", wait_until="domcontentloaded")
                page.wait_for_function(f"() => {BLOCK_TEXTS}.length > 0", timeout=180_000)
                t_done = time.time()
            finally:
                browser.close()
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
    return {"mode": "warmed" if warmed else "at once", "server_up_s": t_up - t_launch,
            "ready_s": ready["t"] - t_launch if "t" in ready else None,
            "from_page_request_s": t_done - t_request, "from_launch_s": t_done - t_launch}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    if not Path(CHROMIUM).exists():
        print(f"{CHROMIUM} is not installed (apt-get install chromium)", file=sys.stderr)
        return 2
    runs = []
    for i in range(args.runs):
        for warmed in (False, True):  # alternated, so machine drift hits both kinds alike
            runs.append(one_run(free_port(), warmed))
            print(f"run {i + 1}: " + ", ".join(f"{k} {v:.1f} s" if isinstance(v, float) else f"{k} {v}"
                                              for k, v in runs[-1].items()), flush=True)
    keys = ("server_up_s", "ready_s", "from_page_request_s", "from_launch_s")
    med = {mode: {k: statistics.median(r[k] for r in runs if r["mode"] == mode and r[k] is not None)
                  for k in keys} for mode in ("at once", "warmed")}
    env = device_info("cpu").to_dict()
    report = {"environment": env, "runs": runs, "median": med, "target_s": {"from_launch": 10.0,
              "from_page_request": 5.0}, "command": "python benchmarks/first_prediction.py --runs " + str(args.runs)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "first_prediction.json").write_text(json.dumps(report, indent=1))

    def cell(v) -> str:
        return "-" if v is None else f"{v:.1f}"

    rows = "\n".join(f"| {i + 1} | {r['mode']} | " + " | ".join(cell(r[k]) for k in keys) + " |"
                     for i, r in enumerate(runs))
    meds = "\n".join(f"| median | {mode} | " + " | ".join(cell(m[k]) for k in keys) + " |" for mode, m in med.items())
    (out / "first_prediction.md").write_text(
        f"# First prediction after `streamlit run app.py`\n\n{environment_markdown(env)}\n\n"
        "Default model from `data/`, default sample, fresh server per run. \"at once\": Chromium opens the page as "
        "soon as the port answers, while the server's start-up hook is still loading the default model; "
        "\"warmed\": it opens the page once the server has printed that the model is ready.\n\n"
        "| run | page opened | server up (s) | model ready (s) | page request -> block map (s) | "
        f"launch -> block map (s) |\n|---:|---|---:|---:|---:|---:|\n{rows}\n{meds}\n\n"
        "Targets: <= 10 s from launch (issue 6); <= 5 s from the page request for the ImageNet default (issue 17). "
        f"Command: `{report['command']}`\n")
    print(f"wrote {out / 'first_prediction.json'} and .md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
