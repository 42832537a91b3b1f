"""Render `rlhf report`'s page in a real headless browser and save a PNG of it (docs/img/report.png).

    python scripts/report_screenshot.py runs/tiny [--out docs/img/report.png] [--width 1400] [--height 4000]

RUN_ROOT may also be an HTML file `rlhf report` wrote. Needs Chromium (`apt-get install -y chromium`) or Chrome;
it runs with no network, no sandbox (root in a container) and no GPU.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from rlhf.tools.report import write_report

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--hide-scrollbars",
)


def screenshot(page: Path, out: Path, width: int, height: int) -> Path:
    browser = next((b for b in map(shutil.which, BROWSERS) if b), None)
    if browser is None:
        raise SystemExit(f"no headless browser found (tried {', '.join(BROWSERS)}): apt-get install -y chromium")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as profile:
        cmd = [browser, *FLAGS, f"--user-data-dir={profile}", f"--screenshot={out.resolve()}"]
        cmd += [f"--window-size={width},{height}", page.resolve().as_uri()]
        subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    if not out.is_file():
        raise SystemExit(f"{browser} wrote no {out}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_root", help="a run root (rlhf report writes the page first) or a report's HTML file")
    parser.add_argument("--out", default="docs/img/report.png")
    parser.add_argument("--width", type=int, default=1400)
    parser.add_argument("--height", type=int, default=4000)
    args = parser.parse_args()
    source = Path(args.run_root)
    page = source if source.is_file() else write_report(source)
    print(screenshot(page, Path(args.out), args.width, args.height))


if __name__ == "__main__":
    sys.exit(main())
