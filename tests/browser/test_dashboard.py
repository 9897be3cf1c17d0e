"""The dashboard in a real browser (Playwright for Python driving Debian's chromium) against
the whole appliance as ``make run`` starts it, with a real NBD client connected.

Screenshots of every page go to artifacts/screenshots/.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, require, wait_until
from e2e.stack import Stack, start_stack
from nbdclient import NbdClient, pattern

pytestmark = [pytest.mark.browser, pytest.mark.slow]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]
SCREENSHOTS = ROOT / "artifacts" / "screenshots"
USER, PASSWORD = "operator", "dashboard-test-password-7Q"
MiB = 1 << 20
WAIT_MS = 20_000
# Forms answer their refusals with 400 or 409 on purpose: chromium logs those too.
EXPECTED = re.compile(r"^Failed to load resource: .* status of (400|409) ")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    require("redis-server", "nbdinfo")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"not installed: {CHROMIUM} (apt-get install chromium)")
    pytest.importorskip("playwright.sync_api")
    running = start_stack(
        tmp_path_factory.mktemp("dashboard"),
        env={"APPLIANCE_ADMIN_USER": USER, "APPLIANCE_ADMIN_PASSWORD": PASSWORD},
    )
    yield running
    assert running.stop() == 0, running.log("worker")[-2000:]


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        instance = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield instance
        instance.close()


@pytest.fixture(scope="module")
def page(stack: Stack, browser: Any) -> Iterator[Any]:
    """One logged-in tab for the whole module; console errors (CSP violations among them)
    fail the test that caused them."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    tab = context.new_page()
    tab.set_default_timeout(WAIT_MS)
    tab.console_errors = []
    tab.on("console", lambda m: m.type == "error" and not EXPECTED.search(m.text)
           and tab.console_errors.append(m.text))
    tab.on("pageerror", lambda e: tab.console_errors.append(str(e)))
    yield tab
    context.close()


@pytest.fixture(autouse=True)
def _no_console_errors(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "page" in request.fixturenames:
        tab = request.getfixturevalue("page")
        errors, tab.console_errors[:] = list(tab.console_errors), []
        assert not errors, errors


def shot(page: Any, name: str) -> None:
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)


def nbd_port(stack: Stack) -> int:
    return int(stack.demo_uri.rsplit(":", 1)[1].split("/")[0])


def served(stack: Stack, export: str) -> bool:
    uri = f"nbd://127.0.0.1:{nbd_port(stack)}/{export}"
    return subprocess.run(["nbdinfo", "--size", uri], capture_output=True,
                          timeout=30).returncode == 0


def field_error(page: Any, field_id: str) -> str:
    return page.locator(f"#{field_id}-errors").inner_text()


def test_login_required_then_log_in(stack: Stack, page: Any) -> None:
    response = page.goto(f"{stack.web}/exports/")
    assert "/login/" in page.url
    assert "script-src 'self'" in response.headers["content-security-policy"]
    shot(page, "01-login")
    page.fill("#id_username", USER)
    page.fill("#id_password", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(re.compile(r"/exports/$"))
    assert page.locator("header.top .who").inner_text() == USER


def test_create_image_through_the_form(stack: Stack, page: Any) -> None:
    page.goto(f"{stack.web}/images/")
    page.fill("#id_create-name", "web-disk")
    page.fill("#id_create-size", "64M")
    page.fill("#id_create-description", "made in the browser")
    page.click("#create-image button[type=submit]")
    page.wait_for_selector("ul.messages >> text=Created image web-disk")
    row = page.locator("tr[data-image='web-disk']")
    assert "64 MiB" in row.inner_text()
    assert row.locator("svg.bar rect.allocated").count() == 1


def test_image_form_errors_beside_the_fields(stack: Stack, page: Any) -> None:
    page.goto(f"{stack.web}/images/")
    page.fill("#id_create-name", "other-disk")
    page.fill("#id_create-size", "12 parsecs")
    page.click("#create-image button[type=submit]")
    assert "is not a size" in field_error(page, "id_create-size")
    page.fill("#id_create-name", "web-disk")
    page.fill("#id_create-size", "1G")
    page.click("#create-image button[type=submit]")
    assert "already exists" in field_error(page, "id_create-name")
    shot(page, "02-images-form-errors")


def test_create_export_through_the_form(stack: Stack, page: Any) -> None:
    page.goto(f"{stack.web}/exports/")
    page.fill("#id_name", "web-disk")
    page.select_option("#id_image", label="web-disk")
    page.fill("#id_description", "browser test export")
    page.fill("#id_allowed_networks", "10.0.0.1/8")
    page.click("#create-export button[type=submit]")
    assert "did you mean '10.0.0.0/8'" in field_error(page, "id_allowed_networks")
    shot(page, "03-exports-form-error")
    page.fill("#id_allowed_networks", "127.0.0.0/8, 10.0.0.0/8")
    page.click("#create-export button[type=submit]")
    page.wait_for_url(re.compile(r"/exports/\d+/$"))
    uri = page.locator("#export-uri").inner_text()
    assert uri == f"nbd://127.0.0.1:{nbd_port(stack)}/web-disk"
    body = page.locator("main").inner_text()
    assert f"qemu-system-x86_64 -m 2048 -drive file={uri},format=raw,if=virtio" in body
    assert f"nbdcopy --progress {uri}" in body
    assert f"qemu-img info {uri}" in body


def test_client_appears_live_with_features_and_growing_counters(stack: Stack, page: Any) -> None:
    assert wait_until(lambda: served(stack, "web-disk"), timeout=30)
    page.goto(f"{stack.web}/exports/")
    page.click("tr[data-export='web-disk'] a")
    page.wait_for_selector("#export-panel >> text=No client is connected")
    loaded_at = page.evaluate("performance.timeOrigin")
    with NbdClient.connect(nbd_port(stack)) as client:
        client.handshake("web-disk")
        assert client.write(0, pattern(0, MiB)).ok
        for _ in range(4):
            assert client.read(0, MiB).ok
        # The panel is polled: the client shows up without the page being reloaded.
        row = page.wait_for_selector("#client-list tr.client")
        assert page.evaluate("performance.timeOrigin") == loaded_at
        text = row.inner_text()
        assert "libnbd" in text or "unknown" in text or "qemu" in text
        for feature in ("structured replies", "NO_ZEROES"):
            assert page.locator(f"tr.client .feature.yes[data-feature='{feature}']").count() == 1
        assert page.locator("tr.client .feature.no[data-feature='TLS']").count() == 1
        assert "base:allocation" in text
        ops = page.locator("tr.client [data-counter='ops']")
        before = int(ops.inner_text())
        assert before >= 5
        for _ in range(8):
            assert client.read(MiB, MiB).ok
        # (page.wait_for_function would evaluate a string: the page's CSP forbids that.)
        assert wait_until(lambda: int(ops.inner_text()) > before, timeout=20)
        assert int(ops.inner_text()) >= before + 8
        assert page.locator("#live-clients").inner_text() == "1"
        # Rates and plots have had time to draw from live counters.
        page.wait_for_selector("#chart-ops svg path.series", state="attached")
        time.sleep(3)
        shot(page, "04-export-detail-live")
        page.goto(f"{stack.web}/")
        page.wait_for_selector("#throughput-chart svg")
        assert "web-disk" in page.locator("#overview-panel").inner_text()
        page.wait_for_selector("#throughput-chart path.series", state="attached")
        deadline = time.monotonic() + 6  # traffic for the live throughput plot
        while time.monotonic() < deadline:
            assert client.read(0, MiB).ok
            time.sleep(0.05)
        shot(page, "05-overview")
        client.disconnect()


def test_qemu_io_appears_live_and_leaves(stack: Stack, page: Any) -> None:
    """The same with a real client tool: qemu-io, pausing between its reads."""
    require("qemu-io")
    page.goto(f"{stack.web}/exports/")
    page.click("tr[data-export='web-disk'] a")
    page.wait_for_selector("#export-panel >> text=No client is connected")
    commands: list[str] = []
    for _ in range(8):
        commands += ["-c", "read 0 1M", "-c", "sleep 1000"]
    qemu_io = subprocess.Popen(
        ["qemu-io", "-f", "raw", *commands, f"nbd://127.0.0.1:{nbd_port(stack)}/web-disk"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        row = page.wait_for_selector("#client-list tr.client", timeout=20_000)
        assert "qemu" in row.inner_text()
        assert page.locator("tr.client .feature.yes[data-feature='structured replies']").count()
        ops = page.locator("tr.client [data-counter='ops']")
        assert wait_until(lambda: ops.count() == 1 and int(ops.inner_text()) >= 1, timeout=20)
        first = int(ops.inner_text())
        assert wait_until(lambda: ops.count() == 1 and int(ops.inner_text()) > first,
                          timeout=20)
        assert qemu_io.wait(60) == 0
    finally:
        if qemu_io.poll() is None:
            qemu_io.kill()
            qemu_io.wait()
    page.wait_for_selector("#export-panel >> text=No client is connected", timeout=20_000)


def test_feature_adoption_chart(stack: Stack, page: Any) -> None:
    page.goto(f"{stack.web}/features/?period=1h")
    page.wait_for_selector("#feature-chart svg rect.bar")
    table = page.locator("#feature-table").inner_text()
    assert "structured replies" in table
    shot(page, "06-feature-adoption")


def test_disable_the_export(stack: Stack, page: Any) -> None:
    page.goto(f"{stack.web}/exports/")
    page.click("tr[data-export='web-disk'] a")
    page.click("button[data-action='disable']")
    page.wait_for_selector("ul.messages >> text=Export web-disk disabled")
    assert page.locator("#export-state").inner_text() == "disabled"
    assert wait_until(lambda: not served(stack, "web-disk"), timeout=30)
    page.goto(f"{stack.web}/exports/")
    assert "disabled" in page.locator("tr[data-export='web-disk']").inner_text()
    shot(page, "07-exports")


def test_image_pages_and_delete_confirmation(stack: Stack, page: Any) -> None:
    page.goto(f"{stack.web}/images/")
    shot(page, "08-images")
    page.click("tr[data-image='web-disk'] a >> nth=0")
    page.fill("#id_grow-size", "128M")
    page.click("#grow-image button[type=submit]")
    page.wait_for_selector("ul.messages >> text=is now 128 MiB")
    shot(page, "09-image-detail")
    page.click("a.button.danger")
    page.wait_for_selector("#confirm-delete")
    shot(page, "10-image-delete-confirm")
    page.click("#confirm-delete button[type=submit]")
    assert "while exports use it" in page.locator(".form-errors").inner_text()


def nbdinfo_tls(stack: Stack, client_dir: Path) -> subprocess.CompletedProcess[bytes]:
    uri = f"nbds://127.0.0.1:{nbd_port(stack)}/demo?tls-certificates={client_dir}"
    return subprocess.run(["nbdinfo", "--size", uri], capture_output=True, timeout=30)


def test_security_issue_use_and_revoke_a_certificate(stack: Stack, page: Any,
                                                     tmp_path: Path) -> None:
    """Issue a client certificate in the browser, connect over TLS with the files the page
    shows, revoke it: the list says so, the engine refuses it, and the refusal is shown."""
    page.goto(f"{stack.web}/security/")
    assert len(page.locator("#ca-fingerprint").inner_text()) == 64
    shot(page, "11-security")
    page.fill("#id_issue-name", "browser-client")
    page.click("#issue-certificate button[type=submit]")
    page.wait_for_selector("#key-once")
    client_dir = tmp_path / "browser-client"
    client_dir.mkdir(mode=0o700)
    blocks = page.locator("pre.pem-text")
    for i in range(blocks.count()):
        block = blocks.nth(i)
        (client_dir / block.get_attribute("data-file")).write_text(block.inner_text())
    assert sorted(p.name for p in client_dir.iterdir()) == [
        "ca-cert.pem", "client-cert.pem", "client-key.pem"]
    assert "tls-creds-x509,id=tls0,endpoint=client" in page.locator("main").inner_text()
    shot(page, "12-certificate-issued")
    assert wait_until(lambda: nbdinfo_tls(stack, client_dir).returncode == 0, timeout=30)
    page.click("text=Done")
    row = page.locator("tr[data-certificate='browser-client']")
    assert row.get_attribute("data-state") == "active"
    row.locator("button[data-action='revoke']").click()
    page.wait_for_selector("ul.messages >> text=Revoked the certificate of browser-client")
    assert row.get_attribute("data-state") == "revoked"
    assert wait_until(lambda: nbdinfo_tls(stack, client_dir).returncode != 0, timeout=30)

    def refusal_listed() -> bool:
        page.goto(f"{stack.web}/security/?kind=tls_handshake")
        return page.locator("#refusal-list tr.refusal").count() > 0

    assert wait_until(refusal_listed, timeout=30)
    assert "TLS handshake failed" in page.locator("#refusal-list").inner_text()
    shot(page, "13-security-refusals")


def test_log_out(stack: Stack, page: Any) -> None:
    page.goto(f"{stack.web}/")
    page.click("header.top .logout button")
    page.wait_for_url(re.compile(r"/login/"))
    page.goto(f"{stack.web}/images/")
    assert "/login/" in page.url


def test_screenshots_saved() -> None:
    assert shutil.which("true")  # keeps the module's order obvious in reports
    assert len(list(SCREENSHOTS.glob("*.png"))) >= 8
