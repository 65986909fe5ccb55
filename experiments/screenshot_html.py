"""Screenshot a run's interactive Pareto plot in headless Chromium, and check that it rendered.

Opens ``RUN_DIR/pareto.html`` (or an .html file given directly) twice in headless Chromium
(Debian: ``apt-get install chromium``): once to dump the DOM after the scripts ran, to check that
plotly drew its SVG and that the page logged no JavaScript error; once to save a screenshot.
Exits 1 if the page is broken (a JS error, or no plot drawn).

Usage:
    python experiments/screenshot_html.py runs/demo out.png [--window-size 1200,800]
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
    "--enable-logging=stderr", "--v=0",
    "--virtual-time-budget=5000",  # let the page's scripts finish before the dump / screenshot
]
# Chromium logs page console messages as `...:CONSOLE(line)] "message", source: ...`
_CONSOLE = re.compile(r'CONSOLE\(\d+\)\] "(.*)", source: (.*)')


def _browser() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    sys.exit("no Chromium found: apt-get install -y chromium")


def _run(browser: str, url: str, extra: list[str], size: str) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        cmd = [browser, *FLAGS, f"--user-data-dir={profile}", f"--window-size={size}", *extra, url]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=180)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", help="run folder (with pareto.html) or an .html file")
    p.add_argument("out", help="PNG to write")
    p.add_argument("--window-size", default="1200,800")
    args = p.parse_args()

    page = Path(args.run)
    if page.is_dir():
        page = page / "pareto.html"
    if not page.is_file():
        sys.exit(f"{page}: no such file (autoshrink pareto DIR writes it)")
    browser = _browser()
    url = page.resolve().as_uri()

    dump = _run(browser, url, ["--dump-dom"], args.window_size)
    messages = [m.groups() for m in _CONSOLE.finditer(dump.stderr)]
    errors = [f"{text} ({source})" for text, source in messages
              if "Uncaught" in text or "Error" in text]
    drew = 'class="main-svg"' in dump.stdout
    traces = len(re.findall(r'class="trace scatter', dump.stdout))
    menus = len(re.findall(r'class="updatemenu-header-group"', dump.stdout))

    shot = _run(browser, url, [f"--screenshot={Path(args.out).resolve()}"], args.window_size)
    if shot.returncode != 0 or not Path(args.out).is_file():
        sys.exit(f"screenshot failed (exit {shot.returncode}): {shot.stderr[-2000:]}")

    print(f"{page}: {len(dump.stdout) / 1e6:.1f} MB DOM, plot drawn: {drew}, {traces} scatter traces, "
          f"{menus} axis menus, {len(messages)} console messages, {len(errors)} errors")
    for text, source in messages:
        print(f"  console: {text[:300]} ({source})")
    print(f"wrote {args.out}")
    if errors or not drew:
        sys.exit(1)


if __name__ == "__main__":
    main()
