"""Time to the first prediction after ``streamlit run app.py`` (issue 6 target: <= 10 s on CPU; issue 17, ImageNet default: <= 5 s from the page request).

Each run starts a fresh ``streamlit run app.py`` (the default model from ``data/``, default settings), opens
the app in Debian's Chromium through Playwright as soon as the port answers, and waits for the Inspect page's
block map (the bars labelled "fired"/"bypassed") for the default sample. Two times per run:

* ``from_launch_s``: from starting the ``streamlit run`` process to the block map on screen (what a user who
  types the command and opens the page at once waits);
* ``from_page_request_s``: from the page request to the block map (the server already up).

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


def one_run(port: int) -> dict:
    from playwright.sync_api import sync_playwright

    t_launch = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", "app.py", "--server.headless", "true",
                             "--server.port", str(port), "--server.address", "127.0.0.1",
                             "--browser.gatherUsageStats", "false"], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
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
    return {"server_up_s": t_up - t_launch, "from_page_request_s": t_done - t_request,
            "from_launch_s": t_done - t_launch}


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
        runs.append(one_run(free_port()))
        print(f"run {i + 1}: " + ", ".join(f"{k} {v:.1f} s" for k, v in runs[-1].items()), flush=True)
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    env = device_info("cpu").to_dict()
    report = {"environment": env, "runs": runs, "median": med, "target_s": 10.0,
              "command": "python benchmarks/first_prediction.py --runs " + str(args.runs)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "first_prediction.json").write_text(json.dumps(report, indent=1))
    rows = "\n".join(f"| {i + 1} | {r['server_up_s']:.1f} | {r['from_page_request_s']:.1f} | {r['from_launch_s']:.1f} |"
                     for i, r in enumerate(runs))
    (out / "first_prediction.md").write_text(
        f"# First prediction after `streamlit run app.py`\n\n{environment_markdown(env)}\n\n"
        "Default model from `data/`, default sample, fresh server per run, Chromium opened as soon as the port "
        "answers.\n\n| run | server up (s) | page request -> block map (s) | launch -> block map (s) |\n"
        f"|---:|---:|---:|---:|\n{rows}\n| median | {med['server_up_s']:.1f} | {med['from_page_request_s']:.1f} | "
        f"{med['from_launch_s']:.1f} |\n\nTargets: <= 10 s from launch (issue 6); <= 5 s from the page request for the ImageNet default (issue 17). Command: `{report['command']}`\n")
    print(f"wrote {out / 'first_prediction.json'} and .md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
