"""Headless Chromium for tests: render a local HTML file, read back the DOM after its
scripts ran, or take a screenshot. No server, no network (flags keep Chromium from
phoning home), a throw-away profile per call."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--enable-logging=stderr", "--v=0", "--hide-scrollbars",
)

# Injected into a copy of the page: records script errors from the first moment, and
# once everything loaded writes what a reader would see into a <pre> read via --dump-dom.
_ERROR_CATCHER = """<script>
window.__errors = [];
window.addEventListener('error', function (e) { window.__errors.push(String(e.message || e.type)); }, true);
</script>"""
_PROBE = """<script>
window.addEventListener('load', function () {
  var images = Array.prototype.map.call(document.images, function (img) {
    return {src: img.src.slice(0, 22), width: img.naturalWidth, height: img.naturalHeight,
            complete: img.complete, alt: img.alt};
  });
  var out = document.createElement('pre');
  out.id = '__probe';
  out.textContent = JSON.stringify({images: images, errors: window.__errors,
    tables: document.querySelectorAll('table').length, headings: Array.prototype.map.call(
      document.querySelectorAll('h2'), function (h) { return h.textContent; })});
  document.body.appendChild(out);
});
</script>"""


def require_chromium() -> str:
    if not Path(CHROMIUM).is_file():
        raise RuntimeError(f"{CHROMIUM} is missing: install Debian's chromium (apt-get install -y chromium)")
    return CHROMIUM


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    try:
        return subprocess.run([require_chromium(), *_FLAGS, f"--user-data-dir={profile}", *args],
                              capture_output=True, text=True, timeout=timeout)
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def probe_page(html_file: Path, timeout: float = 60) -> tuple[dict, str]:
    """(what the probe saw: images with natural sizes, script errors, ...; Chromium's stderr)."""
    page = Path(html_file).read_text(encoding="utf-8")
    if "<head>" not in page or "</body>" not in page:
        raise ValueError(f"{html_file} is not a full HTML page")
    probed = page.replace("<head>", "<head>" + _ERROR_CATCHER, 1).replace("</body>", _PROBE + "</body>", 1)
    with tempfile.TemporaryDirectory() as folder:
        copy = Path(folder) / "probe.html"
        copy.write_text(probed, encoding="utf-8")
        result = _run(["--virtual-time-budget=10000", "--dump-dom", copy.as_uri()], timeout)
    found = re.search(r'<pre id="__probe">(.*?)</pre>', result.stdout, re.S)
    if found is None:
        raise RuntimeError(f"the probe never ran (exit {result.returncode}); stderr tail:\n{result.stderr[-2000:]}")
    import html

    return json.loads(html.unescape(found.group(1))), result.stderr


def screenshot(html_file: Path, png: Path, width: int = 1280, height: int = 4000, timeout: float = 60) -> Path:
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    result = _run([f"--screenshot={png}", f"--window-size={width},{height}", "--virtual-time-budget=10000",
                   Path(html_file).resolve().as_uri()], timeout)
    if not png.is_file():
        raise RuntimeError(f"no screenshot written (exit {result.returncode}); stderr tail:\n{result.stderr[-2000:]}")
    return png


def uncaught_errors(stderr: str) -> list[str]:
    """Console lines Chromium logs for uncaught script errors."""
    return [line for line in stderr.splitlines() if "Uncaught" in line]
