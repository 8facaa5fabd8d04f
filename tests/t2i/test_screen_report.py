"""report.html of a caption-screening run: self-contained, escaped, thumbnails and placeholders, the empty case; then
loaded in a real headless Chromium over the DevTools Protocol (a minimal stdlib WebSocket client below): no error,
no network request, every image decoded, the confirmed table's rows and the title."""

from __future__ import annotations

import base64
import hashlib
import html
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from diffmem.common.t2i.screen.report import ScreenReport, write_report

EVIL = '<script>alert(1)</script> & "x"'
TITLE = 'Screen report — tiny & "quoted"'
TIMEOUT = 15.0


def _png(path: Path, color: tuple[int, int, int]) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), color).save(path, format="PNG")
    return path


def _report(tmp_path: Path, missing: bool = False) -> tuple[Path, ScreenReport, int]:
    """A report in tmp_path/out with 3 confirmed captions (one relative image path, the rest absolute), calibration
    scores and a threshold; with missing, one more image path that does not exist. Returns (path, report, images)."""
    out = tmp_path / "out"
    _png(out / "gen" / "0_0.png", (255, 0, 0))
    images = [
        ["gen/0_0.png", str(_png(tmp_path / "abs" / "0_1.png", (0, 255, 0)))],
        [str(_png(tmp_path / "abs" / "1_0.png", (0, 0, 255)))],
        [str(_png(tmp_path / "abs" / "2_0.png", (9, 9, 9))), str(_png(tmp_path / "abs" / "2_1.png", (200, 9, 90)))],
    ]
    if missing:
        images[1].append("gen/does_not_exist.png")
    confirmed = [
        {"caption": "The No Limits Business Woman Podcast", "score": 4.5, "verdict": "memorized", "cluster_size": 4,
         "median_sscd": 0.81, "gt_sscd": 0.9, "rank": 1, "images": images[0]},
        {"caption": EVIL, "score": 3.25, "verdict": "not", "cluster_size": 1, "median_sscd": 0.12, "rank": 2,
         "images": images[1]},
        {"caption": "mountains at dawn", "score": 3.0, "verdict": "not", "cluster_size": 1, "median_sscd": 0.05,
         "gt_sscd": None, "rank": 3, "images": images[2]},
    ]
    report = ScreenReport(
        title=TITLE,
        counts={"captions": 1000, "unique": 900, "confirmed": 3},
        throughput={"captions/s": 12.5, "device": "cpu"},
        scores=[0.1 * (i % 37) for i in range(900)],
        calibration_scores=[0.05 * (i % 23) for i in range(200)],
        threshold=2.5,
        fpr=0.01,
        confirmed=confirmed,
        settings={"G": 4, "steps": 1, "model": "tiny"},
        near_duplicate_threshold=0.5,
    )
    n_images = sum(len(x) for x in images) - int(missing)
    return write_report(out / "report.html", report), report, n_images


# ---------------------------------------------------------------------------------------------------------- unit


def test_report_is_self_contained_and_escaped(tmp_path):
    path, _, n_images = _report(tmp_path)
    assert path == tmp_path / "out" / "report.html" and path.is_file()
    page = path.read_text(encoding="utf-8")
    assert 'src="http' not in page and 'href="http' not in page
    assert "<script" not in page.lower()
    assert html.escape(EVIL) in page
    assert "<script>alert(1)" not in page
    assert html.escape(TITLE) in page
    assert page.count("<img") == n_images + 1  # the thumbnails and the histogram
    assert page.count('src="data:image/png;base64,') == n_images + 1
    assert 'class="missing"' not in page
    assert page.count('<table id="confirmed">') == 1
    assert not list(path.parent.glob(".*.tmp"))


def test_missing_image_gives_placeholder(tmp_path):
    path, _, n_images = _report(tmp_path, missing=True)
    page = path.read_text(encoding="utf-8")
    assert page.count('class="missing"') == 1
    assert ">does_not_exist.png</span>" in page
    assert page.count("<img") == n_images + 1


def test_empty_report_writes_its_sentences(tmp_path):
    report = ScreenReport(title="empty", counts={"captions": 0}, throughput={}, scores=[], calibration_scores=None,
                          threshold=None, fpr=None, confirmed=[], settings={})
    path = write_report(tmp_path / "sub" / "report.html", report)
    page = path.read_text(encoding="utf-8")
    assert "No caption was scored." in page
    assert "No caption was confirmed." in page
    assert "<img" not in page and 'id="confirmed"' not in page


# -------------------------------------------------------------------------- a minimal RFC 6455 client (text only)


class WebSocket:
    """Client side of RFC 6455 over a plain socket: masked text frames out; text frames in (continuations joined,
    16/64-bit lengths), pings answered, other control frames ignored."""

    GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

    def __init__(self, url: str, timeout: float = TIMEOUT):
        m = re.fullmatch(r"ws://([^/:]+):(\d+)(/.*)", url)
        assert m, url
        host, port, resource = m.group(1), int(m.group(2)), m.group(3)
        self.sock = socket.create_connection((host, port), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode("ascii")
        self.sock.sendall((f"GET {resource} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                           f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
                           ).encode("ascii"))
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError(f"handshake closed: {head!r}")
            head += chunk
        head, self.buf = head.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        assert lines[0].split()[1] == "101", lines[0]
        headers = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:] if ":" in ln)}
        accept = base64.b64encode(hashlib.sha1((key + self.GUID).encode("ascii")).digest()).decode("ascii")
        assert headers.get("sec-websocket-accept") == accept, headers

    def _send_frame(self, opcode: int, payload: bytes) -> None:
        n = len(payload)
        head = bytes([0x80 | opcode])
        if n < 126:
            head += bytes([0x80 | n])
        elif n < 1 << 16:
            head += bytes([0x80 | 126]) + struct.pack("!H", n)
        else:
            head += bytes([0x80 | 127]) + struct.pack("!Q", n)
        mask = os.urandom(4)
        self.sock.sendall(head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))

    def send(self, text: str) -> None:
        self._send_frame(0x1, text.encode("utf-8"))

    def _read(self, n: int, deadline: float) -> bytes:
        while len(self.buf) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("websocket read timed out")
            self.sock.settimeout(left)
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("websocket closed")
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def recv(self, deadline: float) -> str:
        """The next whole text message (before deadline, a time.monotonic() value)."""
        parts: list[bytes] = []
        while True:
            b0, b1 = self._read(2, deadline)
            fin, opcode, n = b0 & 0x80, b0 & 0x0F, b1 & 0x7F
            if n == 126:
                n = struct.unpack("!H", self._read(2, deadline))[0]
            elif n == 127:
                n = struct.unpack("!Q", self._read(8, deadline))[0]
            mask = self._read(4, deadline) if b1 & 0x80 else b""
            payload = self._read(n, deadline)
            if mask:
                payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
            if opcode == 0x8:
                raise ConnectionError("websocket closed by the server")
            if opcode == 0x9:
                self._send_frame(0xA, payload)  # pong
                continue
            if opcode in (0x1, 0x0) and (parts or opcode == 0x1):
                parts.append(payload)
                if fin:
                    return b"".join(parts).decode("utf-8")
            # binary and other frames: ignored

    def close(self) -> None:
        try:
            self._send_frame(0x8, b"")
        except OSError:
            pass
        self.sock.close()


class DevTools:
    """Commands and events of one CDP target; every event received is kept in events."""

    def __init__(self, ws: WebSocket):
        self.ws, self.next_id, self.events = ws, 0, []

    def _pump(self, done, timeout: float = TIMEOUT, what: str = "") -> dict:
        deadline = time.monotonic() + timeout
        while True:
            try:
                msg = json.loads(self.ws.recv(deadline))
            except TimeoutError:
                raise TimeoutError(f"no {what} within {timeout:g} s") from None
            if "method" in msg:
                self.events.append(msg)
            hit = done(msg)
            if hit:
                return msg

    def call(self, method: str, **params) -> dict:
        self.next_id += 1
        cid = self.next_id
        self.ws.send(json.dumps({"id": cid, "method": method, "params": params}))
        msg = self._pump(lambda m: m.get("id") == cid, what=method)
        assert "error" not in msg, (method, msg["error"])
        return msg["result"]

    def wait_event(self, method: str, since: int = 0) -> dict:
        for ev in self.events[since:]:
            if ev["method"] == method:
                return ev
        return self._pump(lambda m: m.get("method") == method, what=method)


def _find_browser() -> str | None:
    for name in ("chromium-headless-shell", "chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def _devtools_url(proc: subprocess.Popen, log: Path) -> str:
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        m = re.search(r"DevTools listening on (ws://\S+)", log.read_text(errors="replace"))
        if m:
            return m.group(1)
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    raise AssertionError(f"no DevTools line from the browser (exit {proc.poll()}):\n{log.read_text()[-2000:]}")


def _page_target(port: int) -> str:
    deadline = time.monotonic() + TIMEOUT
    while True:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=TIMEOUT) as r:
            targets = json.load(r)
        pages = [t for t in targets if t.get("type") == "page" and "webSocketDebuggerUrl" in t]
        if pages:
            return pages[0]["webSocketDebuggerUrl"]
        assert time.monotonic() < deadline, f"no page target: {targets}"
        time.sleep(0.1)


PROBE = """(() => {
  const rows = [...document.querySelectorAll('#confirmed tr')];
  return {
    title: document.title,
    rows: rows.length,
    captions: rows.slice(1).map(r => r.cells[1].textContent),
    memorized: document.querySelectorAll('#confirmed tr.memorized').length,
    imgs: [...document.images].map(i => ({complete: i.complete, w: i.naturalWidth, h: i.naturalHeight, alt: i.alt})),
    scripts: document.scripts.length,
  };
})()"""


def test_report_in_headless_chromium(tmp_path):
    browser = _find_browser()
    if browser is None:
        pytest.skip("no Chromium (chromium-headless-shell, chromium, chromium-browser, google-chrome) on PATH")
    path, report, n_images = _report(tmp_path)
    log = tmp_path / "browser.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen([browser, "--headless", "--no-sandbox", "--remote-debugging-port=0",
                                 f"--user-data-dir={tmp_path / 'profile'}", "about:blank"],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
    ws = None
    try:
        url = _devtools_url(proc, log)
        port = int(re.match(r"ws://[^:/]+:(\d+)/", url).group(1))
        ws = WebSocket(_page_target(port))
        cdp = DevTools(ws)
        for domain in ("Runtime", "Log", "Network", "Page"):
            cdp.call(f"{domain}.enable")
        start = len(cdp.events)
        nav = cdp.call("Page.navigate", url=path.resolve().as_uri())
        assert "errorText" not in nav, nav
        cdp.wait_event("Page.loadEventFired", since=start)
        probe = cdp.call("Runtime.evaluate", expression=PROBE, returnByValue=True)
        assert "exceptionDetails" not in probe, probe
        value = probe["result"]["value"]

        events = cdp.events[start:]
        by = lambda name: [e["params"] for e in events if e["method"] == name]  # noqa: E731
        assert by("Runtime.exceptionThrown") == []
        assert [c for c in by("Runtime.consoleAPICalled") if c["type"] in ("error", "warning")] == []
        assert [e["entry"] for e in by("Log.entryAdded") if e["entry"]["level"] == "error"] == []
        urls = [r["request"]["url"] for r in by("Network.requestWillBeSent")]
        assert urls, "the navigation itself was not seen"
        assert [u for u in urls if not u.startswith(("file://", "data:"))] == []
        assert by("Network.loadingFailed") == []

        assert value["title"] == TITLE
        assert value["rows"] == len(report.confirmed) + 1
        assert value["captions"][1] == EVIL  # shown as text, not run
        assert value["memorized"] == 1
        assert value["scripts"] == 0
        assert len(value["imgs"]) == n_images + 1
        assert all(i["complete"] and i["w"] > 0 for i in value["imgs"]), value["imgs"]
    finally:
        if ws is not None:
            ws.close()
        proc.kill()
        proc.wait(timeout=10)
