"""Screenshot TensorBoard's custom-scalars chart of ``bound/value`` against ``bound/gap``.

Trains the digits demo for a few epochs in a temporary directory, serves its logs with a real TensorBoard
server and opens the ``#custom_scalars`` dashboard in headless Chromium, driven over the DevTools protocol:
smoothing off, chart expanded, y axis on log scale (non-positive gaps, e.g. of the first epochs, drop out of
it), the last step hovered so the tooltip names both series. Standard library only; needs Debian's Chromium
(``apt-get install -y chromium``). Run as root from the repository root (default output docs/bound_vs_gap.png):

    .venv/bin/python docs/screenshot_bound_chart.py [OUTPUT.png] [--epochs N]
"""

import argparse
import base64
import fcntl
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
# Without the background-networking flags Chromium's own connections are refused on a closed network.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--window-size=1400,900", "--remote-debugging-pipe"]
# The dashboard is Polymer: everything sits in nested shadow roots, so document.querySelector cannot reach it.
FIND_CARD = """(() => { const walk = (root) => { for (const el of root.querySelectorAll('*')) {
    if (el.tagName === 'TF-CUSTOM-SCALAR-MULTI-LINE-CHART-CARD') return el;
    const hit = el.shadowRoot && walk(el.shadowRoot); if (hit) return hit; } return null; };
  return walk(document); })()"""
BUTTON = FIND_CARD + ".shadowRoot.querySelector('paper-icon-button[icon=\"%s\"]').click()"
LOADER = FIND_CARD + ".shadowRoot.querySelector('tf-line-chart-data-loader')"
PLOTTED = LOADER + ".shadowRoot.querySelector('vz-line-chart2').shadowRoot.querySelectorAll('path.line').length >= 2"


def wait_for(what: str, check: Callable[[], Any], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.5)


class Chromium:
    """A headless Chromium talking the DevTools protocol over --remote-debugging-pipe (fds 3 and 4)."""

    def __init__(self, profile: str) -> None:
        cmd_r, self._cmd_w = os.pipe()
        self._res_r, res_w = os.pipe()

        def child_fds() -> None:  # move to >= 10 first so the dup2s below cannot clobber each other
            a, b = fcntl.fcntl(cmd_r, fcntl.F_DUPFD, 10), fcntl.fcntl(res_w, fcntl.F_DUPFD, 10)
            os.dup2(a, 3), os.dup2(b, 4)

        self.proc = subprocess.Popen(["chromium", *CHROMIUM_FLAGS, f"--user-data-dir={profile}"], close_fds=False,
                                     preexec_fn=child_fds, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(cmd_r), os.close(res_w)
        self._buf, self._next_id, self.session = b"", 0, None

    def send(self, method: str, **params: Any) -> dict:
        self._next_id += 1
        msg = {"id": self._next_id, "method": method, "params": params}
        if self.session and not method.startswith("Target."):
            msg["sessionId"] = self.session
        os.write(self._cmd_w, json.dumps(msg).encode() + b"\0")
        while True:  # skip events and anything else until our reply arrives
            while b"\0" not in self._buf:
                chunk = os.read(self._res_r, 1 << 20)
                if not chunk:
                    raise RuntimeError("chromium closed the DevTools pipe")
                self._buf += chunk
            raw, self._buf = self._buf.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def eval(self, js: str) -> Any:
        return self.send("Runtime.evaluate", expression=js, returnByValue=True)["result"].get("value")

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        os.close(self._cmd_w), os.close(self._res_r)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_has_scalars(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/data/plugin/scalars/tags", timeout=5) as r:
            return "bound/gap" in json.load(r).get("digits/version_0", {})
    except OSError:
        return False


def screenshot(url: str, out: Path, profile: str) -> None:
    browser = Chromium(profile)
    try:
        target = browser.send("Target.createTarget", url=url)["targetId"]
        browser.session = browser.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        browser.send("Emulation.setDeviceMetricsOverride", width=1400, height=900, deviceScaleFactor=1, mobile=False)
        wait_for("the chart to draw its lines", lambda: browser.eval(PLOTTED))
        browser.eval(BUTTON % "fullscreen")
        # bound/value (~1e6-1e7) flattens bound/gap (~0.01-1) onto zero on a linear axis
        browser.eval(BUTTON % "line-weight")
        time.sleep(3)  # let the expand transition and the rescaled redraw finish
        # hover the last step: the tooltip is the only place TensorBoard names the two same-coloured series
        box = browser.eval(LOADER + ".getBoundingClientRect().toJSON()")
        browser.send("Input.dispatchMouseEvent", type="mouseMoved", x=box["right"] - 50, y=box["top"] + 200)
        time.sleep(1)
        out.write_bytes(base64.b64decode(browser.send("Page.captureScreenshot", format="png")["data"]))
    finally:
        browser.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", nargs="?", type=Path, default=REPO / "docs" / "bound_vs_gap.png")
    parser.add_argument("--epochs", type=int, default=10)
    args = parser.parse_args()
    tmp = tempfile.mkdtemp(prefix="bound_chart_")
    tensorboard = None
    try:
        subprocess.run([str(Path(sys.executable).parent / "pathmonitor"), "fit", "--config",
                        str(REPO / "configs" / "digits.yaml"), "--trainer.max_epochs", str(args.epochs),
                        "--trainer.enable_progress_bar", "false"], cwd=tmp, check=True, stdout=subprocess.DEVNULL)
        port = free_port()
        tensorboard = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", f"{tmp}/runs",
                                        "--host", "127.0.0.1", "--port", str(port)],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for("TensorBoard to serve the run", lambda: run_has_scalars(port), timeout=120)
        # smoothing off: its debiased running mean drags the early (negative) gaps into later points
        url = f"http://127.0.0.1:{port}/#custom_scalars&_smoothingWeight=0"
        screenshot(url, args.output, f"{tmp}/chromium-profile")
        print(f"wrote {args.output}")
    finally:
        if tensorboard:
            tensorboard.terminate()
            tensorboard.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
