"""report.html in headless Chromium: it renders, is not blank, and every image loads (no network, no missing file)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest

BROWSER = shutil.which("chromium") or shutil.which("chromium-browser")
WIDTH, HEIGHT = 1280, 2400

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(BROWSER is None, reason="headless Chromium not installed (Debian: apt-get install chromium)"),
]

#: Appended to a copy of the page: after load, the title says how many images there are and how many failed.
IMAGE_PROBE = (
    "<script>window.addEventListener('load', () => {"
    "const all = Array.from(document.images);"
    "const broken = all.filter(i => !(i.complete && i.naturalWidth > 0)).length;"
    "document.title = 'images:' + all.length + ' broken:' + broken;});</script>"
)


def chromium(profile: Path, *args: str) -> subprocess.CompletedProcess:
    """Headless Chromium with a fresh profile and nothing that talks to the network on its own."""
    cmd = [
        BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
        "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--hide-scrollbars", *args,
    ]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)


def test_report_renders_in_headless_chromium(padim_run: Path, tmp_path: Path) -> None:
    page = tmp_path / "report.html"
    shutil.copy(padim_run / "report.html", page)
    shot = tmp_path / "shot.png"
    res = chromium(tmp_path / "profile1", f"--window-size={WIDTH},{HEIGHT}", f"--screenshot={shot}", page.as_uri())
    assert shot.is_file(), res.stderr[-2000:]
    image = cv2.imread(str(shot), cv2.IMREAD_COLOR)
    assert image is not None and image.shape[:2] == (HEIGHT, WIDTH)
    grey = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    assert float(grey.std()) > 20.0  # text, tables and plots, not an empty page
    assert float((grey < 200).mean()) > 0.02
    colourful = np.abs(image.astype(int) - image.mean(axis=2, keepdims=True)).max(axis=2) > 40
    assert float(colourful.mean()) > 0.005  # the plots and the gallery's heat maps are drawn

    probe = tmp_path / "probe.html"
    probe.write_text(page.read_text(encoding="utf-8").replace("</body>", IMAGE_PROBE + "</body>"), encoding="utf-8")
    res = chromium(tmp_path / "profile2", "--virtual-time-budget=10000", "--dump-dom", probe.as_uri())
    found = re.search(r"<title>images:(\d+) broken:(\d+)</title>", res.stdout)
    assert found, res.stdout[:500] + res.stderr[-2000:]
    assert int(found.group(1)) == page.read_text(encoding="utf-8").count("<img ") >= 3
    assert int(found.group(2)) == 0
