"""`dvc plots show` on the smoke pipeline's reports, rendered in a real headless browser with no network:
every chart renders, with data on its axes (slow: it builds the smoke pipeline)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import BIN, copy_project

BROWSER = next((shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome")
                if shutil.which(name)), None)  # fmt: skip
needs_browser = pytest.mark.skipif(BROWSER is None, reason="no Chromium (Debian: apt install chromium; CI installs it)")

# Every request to another host fails: the page must render from what it carries.
OFFLINE = ["--headless=new", "--no-sandbox", "--disable-gpu", "--host-resolver-rules=MAP * ~NOTFOUND",
           "--virtual-time-budget=20000", "--allow-file-access-from-files"]  # fmt: skip

# chart id (DVC's name without special characters) → (x axis title, y axis title)
EXPECTED = {
    "base_loss": ("step", "cross-entropy"),
    **{f"reports_experts_live_{d}_plots_metrics_{curve}_tsv": ("step", y)
       for d in ("math", "code", "reasoning")
       for curve, y in (("sft_loss", "loss"), ("rl_reward", "reward"), ("rl_reward_mean10", "reward_mean10"),
                        ("rl_kl", "kl"), ("val_accuracy", "val_accuracy"))},
}  # fmt: skip


def _browser(page: Path, *flags: str) -> str:
    done = subprocess.run([BROWSER, *OFFLINE, *flags, page.as_uri()], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def _charts(dom: str) -> dict[str, str]:
    """Each vega chart's rendered markup by its div id (the page's wrapper marks rendered charts)."""
    parts = re.split(r'<div id="([^"]+)"[^>]*\sdata-rendered="(\w+)"', dom)[1:]
    return {parts[i]: parts[i + 1] + "\n" + parts[i + 2] for i in range(0, len(parts), 3)}


def _show(project: Path, out: Path) -> Path:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(["dvc", "plots", "show", "-o", str(out)], cwd=project, env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    page = out / "index.html"
    assert "cdn.jsdelivr" not in page.read_text(), "the page still loads its chart library from the network"
    return page


@pytest.fixture(scope="module")
def plotted_project(full_smoke_project: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    project = copy_project(tmp_path_factory.mktemp("plots") / "project")
    shutil.copytree(full_smoke_project / "reports", project / "reports", dirs_exist_ok=True)
    return project


@pytest.fixture(scope="module")
def plots_page(plotted_project: Path) -> Path:
    return _show(plotted_project, plotted_project.parent / "plots")


@needs_browser
def test_every_plot_renders_offline_with_data_on_its_axes(plots_page: Path, tmp_path: Path):
    charts = _charts(_browser(plots_page, "--dump-dom"))
    assert set(charts) == set(EXPECTED), sorted(charts)
    for chart, (x_title, y_title) in EXPECTED.items():
        markup = charts[chart]
        assert markup.startswith("ok"), f"{chart}: {markup[:300]}"
        titles = re.findall(r'role-axis-title"[^>]*>.*?<text[^>]*>([^<]*)</text>', markup, flags=re.S)
        assert sorted(titles) == sorted([x_title, y_title]), (chart, titles)
        # a line through at least two points (an SVG path with a move and a line segment)
        lines = re.findall(r'class="mark-line role-mark[^"]*"[^>]*>\s*<path[^>]*\sd="(M[^"]*)"', markup)
        assert any("L" in d for d in lines), f"{chart}: no line drawn"

    screenshot = tmp_path / "plots.png"
    _browser(plots_page, f"--screenshot={screenshot}", "--window-size=1400,2400")
    pixels = np.asarray(Image.open(screenshot).convert("L"))
    # charts, not a blank page: plenty of non-white pixels and many grey levels (axes, lines, text)
    assert (pixels < 250).mean() > 0.01 and len(np.unique(pixels)) > 20
    print(f"screenshot: {screenshot}")
