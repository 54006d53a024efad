"""The HTML report in a real browser: headless Chromium (Debian package `chromium`) at 1400 px.

Driven with Python's stdlib only: a probe script appended to a copy of the report measures the
page after load and writes JSON into the DOM, which `--dump-dom` prints. `screenshot()` takes
the first screen as a PNG (for a run's README).
"""
import html
import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import yaml

from conftest import ROOT

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="headless Chromium not found at /usr/bin/chromium (Debian: apt-get install -y "
           "chromium; .ci/run installs it)")

H100 = ROOT / "docs" / "runs" / "2026-11-23-h100-gpu-synthetic" / "results" / "tables"
SEEDS = ROOT / "docs" / "runs" / "2026-11-25-h100-gpu-seeds"
LORA_COST = ROOT / "docs" / "runs" / "2026-11-25-h100-gpu-lora-cost-partial"
WIDTH, HEIGHT = 1400, 900
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars", f"--window-size={WIDTH},{HEIGHT}", "--virtual-time-budget=10000"]

# measured before the <details> are opened (positions as the reader first sees them), then
# with every <details> open (so that folded tables are laid out and their widths count)
PROBE = """<script>
window.addEventListener('load', function () {
  var top = function (e) { return e.getBoundingClientRect().top + window.scrollY; };
  var r = {width: window.innerWidth, height: window.innerHeight, hash: location.hash};
  var summary = document.getElementById('summary-table');
  r.summary_top = summary ? top(summary) : null;
  r.summary_bottom = summary ? summary.getBoundingClientRect().bottom + window.scrollY : null;
  r.headlines_bottom = (function (e) { return e ? e.getBoundingClientRect().bottom : null; })(
    document.querySelector('ul.headlines'));
  var longs = [].slice.call(document.querySelectorAll('details, table')).filter(function (e) {
    return e.tagName === 'DETAILS' || e.tBodies[0].rows.length > 12; });
  r.first_long_top = longs.length ? Math.min.apply(null, longs.map(top)) : null;
  if (location.hash) {
    var t = document.getElementById(decodeURIComponent(location.hash.slice(1)));
    var box = t.getBoundingClientRect();
    r.target = {found: true, open: t.closest('details') ? t.closest('details').open : null,
                in_view: box.top >= 0 && box.bottom <= window.innerHeight};
  }
  r.images = [].slice.call(document.images).map(function (i) {
    return {alt: i.alt, complete: i.complete, width: i.naturalWidth}; });
  document.querySelectorAll('details').forEach(function (d) { d.open = true; });
  r.page_scroll_width = document.documentElement.scrollWidth;
  r.tables = [].slice.call(document.querySelectorAll('table')).map(function (t) {
    var b = t.getBoundingClientRect();
    return {id: t.id, head: t.tHead.rows[0].cells[0].textContent, left: b.left,
            right: b.right, rows: t.tBodies[0].rows.length}; });
  var lat = [].slice.call(document.querySelectorAll('table.sortable')).filter(function (t) {
    return [].slice.call(t.tHead.rows[0].cells).some(function (c) {
      return c.textContent === 'TPOT ms'; }); })[0];
  if (lat) {
    var k = [].slice.call(lat.tHead.rows[0].cells).findIndex(function (c) {
      return c.textContent === 'TPOT ms'; });
    lat.tHead.rows[0].cells[k].click();
    r.sorted_tpot = [].slice.call(lat.tBodies[0].rows).map(function (row) {
      return parseFloat(row.cells[k].dataset.sort); });
  }
  var pre = document.createElement('pre');
  pre.id = 'browser-probe';
  pre.textContent = JSON.stringify(r);
  document.body.appendChild(pre);
});
</script>"""


def _chromium(*args: str, timeout: int = 120) -> str:
    with tempfile.TemporaryDirectory() as profile:
        proc = subprocess.run([str(CHROMIUM), *FLAGS, f"--user-data-dir={profile}", *args],
                              capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def probe(page: Path, fragment: str = "") -> dict:
    """Load a copy of `page` with the probe appended; the probe's measurements."""
    copy = page.with_name(page.stem + ".probe.html")
    copy.write_text(page.read_text().replace("</body>", PROBE + "</body>"))
    try:  # the copy sits beside the page so its relative figure links resolve; never leave it
        dom = _chromium("--dump-dom", copy.as_uri() + fragment)
    finally:
        copy.unlink()
    found = re.search(r'<pre id="browser-probe">(.*?)</pre>', dom, re.S)
    assert found, "the probe did not run: " + dom[-500:]
    return json.loads(html.unescape(found.group(1)))


def screenshot(page: Path, png: Path, height: int = HEIGHT) -> Path:
    """The first screen of `page` at 1400 px wide (the view a reader gets without scrolling)."""
    _chromium(f"--screenshot={png}", f"--window-size={WIDTH},{height}", page.as_uri())
    return png


@pytest.fixture(scope="module")
def h100_page(tmp_path_factory):
    """The committed H100 run's tables re-rendered with this report (into a temp dir)."""
    import plots
    import report
    config = yaml.safe_load((H100.parents[1] / "config.yaml").read_text())  # the run's preset
    out = tmp_path_factory.mktemp("h100-browser")
    plots.main(str(H100), str(out / "figures"), config["models"], config["engines"])
    report.main(str(H100), str(out / "figures"), str(out / "report.md"), str(out / "index.html"),
                config["preset"], config["description"], config["source_reports"],
                config["models"], config["engines"])
    return out / "index.html"


@pytest.fixture(scope="module")
def measured(h100_page):
    return probe(h100_page)


@pytest.fixture(scope="module", params=[SEEDS, LORA_COST], ids=lambda p: p.name)
def seeds_measured(request, tmp_path_factory):
    """The committed full-size run (long setting names, base rows from the LoRA engine) and the
    LoRA-cost run (eight settings, the kernel sweep) through this report, measured in the
    browser."""
    import plots
    import report
    from int4lora.sources import load_sources
    tables = request.param / "results" / "tables"
    config = yaml.safe_load((request.param / "config.yaml").read_text())
    out = tmp_path_factory.mktemp("run-browser")
    plots.main(str(tables), str(out / "figures"), config["models"], config["engines"])
    report.main(str(tables), str(out / "figures"), str(out / "report.md"), str(out / "index.html"),
                config["preset"], config["description"], load_sources(), config["models"],
                config["engines"])
    return probe(out / "index.html")


def test_full_size_run_fits_the_page_and_its_summary_the_first_screen(seeds_measured):
    got = seeds_measured
    assert got["page_scroll_width"] <= WIDTH
    wide = [(t["id"] or t["head"], round(t["right"])) for t in got["tables"]
            if t["right"] > WIDTH or t["left"] < 0]
    assert not wide, wide
    assert got["headlines_bottom"] < got["summary_bottom"] <= got["height"]
    ids = {t["id"] for t in got["tables"]}
    assert "lora-cost-table" in ids


def test_every_image_loads(measured):
    images = measured["images"]
    assert len(images) >= 5
    broken = [i["alt"] for i in images if not i["complete"] or i["width"] == 0]
    assert not broken, broken


def test_no_table_overflows_the_page(measured):
    assert measured["width"] == WIDTH
    assert measured["page_scroll_width"] <= WIDTH
    wide = [(t["id"] or t["head"], round(t["right"])) for t in measured["tables"]
            if t["right"] > WIDTH or t["left"] < 0]
    assert not wide, wide
    assert len(measured["tables"]) >= 10  # the folded tables were laid out and measured


def test_summary_comes_first_and_fits_the_first_screen(measured):
    assert measured["summary_top"] is not None
    assert measured["summary_top"] < measured["first_long_top"]
    # the headlines and the whole summary table without scrolling
    assert measured["headlines_bottom"] < measured["summary_bottom"] <= measured["height"]


def test_a_link_opens_the_folded_row(h100_page):
    got = probe(h100_page, "#bench-mistral-7b-shape-vllm-vllm-r16-qv-lora-adapter-1")
    assert got["target"] == {"found": True, "open": True, "in_view": True}


def test_headers_sort_numerically(measured):
    values = measured["sorted_tpot"]
    assert len(values) == 78 and values == sorted(values)


def test_screenshot_of_the_first_screen(h100_page, tmp_path):
    png = screenshot(h100_page, tmp_path / "first-screen.png")
    head = png.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    assert int.from_bytes(head[16:20], "big") == WIDTH
    assert int.from_bytes(head[20:24], "big") == HEIGHT
    shutil.copy(png, h100_page.with_name("first-screen.png"))
