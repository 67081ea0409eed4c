"""The report opened in headless Chromium: every image loads, sorting works, and the
page makes no network request. Needs the Debian packages `chromium` and
`chromium-driver` and the Python package `selenium`; where Chromium cannot start the
test fails (a skipped browser check would hide a broken report)."""
import json
import shutil
from urllib.parse import urlparse

import pytest

from netdissect_fast import report
from test_report import make_fake_result, make_images

pytestmark = pytest.mark.browser

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--window-size=1400,1000"]


@pytest.fixture
def browser(tmp_path):
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError as e:
        pytest.fail(f"selenium is not installed ({e}): pip install selenium")
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if binary is None or driver_path is None:
        pytest.fail("chromium / chromedriver not found: apt-get install -y chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={tmp_path / 'profile'}"]:
        options.add_argument(flag)
    # The performance log carries the DevTools Network events: every request the page made.
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    try:
        # An explicit driver path keeps Selenium Manager (which may download) out of it.
        driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    except Exception as e:  # noqa: BLE001 - any start failure is a test failure
        pytest.fail(f"headless Chromium did not start: {e}")
    yield driver
    driver.quit()


def requests_made(driver):
    """(document URL, requested URL) of every request logged since the last call."""
    made = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            params = message["params"]
            made.append((params.get("documentURL", ""), params["request"]["url"]))
    return made


def column(driver, key):
    return driver.execute_script(
        "return Array.from(document.querySelectorAll('#units tbody.detectors tr.unit'))"
        ".map(r => r.dataset[arguments[0]]);", key)


def test_report_in_headless_chromium(browser, tmp_path):
    dataset = make_images(tmp_path / "images", 40)
    result_dir = make_fake_result(tmp_path / "result", tmp_path / "images", K=24, n_images=40)
    page = report.write_report(result_dir, dataset)

    requests_made(browser)                              # drop the start page's requests
    browser.get(page.as_uri())
    browser.set_script_timeout(30)
    # Wait for every image (complete), then read its decoded width.
    widths = browser.execute_async_script("""
        const done = arguments[arguments.length - 1];
        const imgs = Array.from(document.images);
        Promise.all(imgs.map(i => i.complete ? null : new Promise(r => { i.onload = i.onerror = r; })))
          .then(() => done(imgs.map(i => [i.getAttribute('src'), i.naturalWidth])));""")
    assert len(widths) == 24 + 2
    assert all(w > 0 for _, w in widths), [s for s, w in widths if w == 0]

    # Rows start sorted by IoU, descending; clicking "Unit" sorts by unit ascending,
    # clicking again descending; "Label" sorts by name.
    ious = [float(v) for v in column(browser, "iou")]
    assert ious == sorted(ious, reverse=True) and len(ious) > 1
    header = browser.find_element("css selector", "#units th[data-key=unit]")
    header.click()
    units = [int(v) for v in column(browser, "unit")]
    assert units == sorted(units) and units != [int(v) for v in column(browser, "unit")][::-1]
    header.click()
    assert [int(v) for v in column(browser, "unit")] == sorted(units, reverse=True)
    browser.find_element("css selector", "#units th[data-key=label]").click()
    labels = column(browser, "label")
    assert labels == sorted(labels, key=lambda s: (s.lower(), s)) or labels == sorted(labels)
    below = browser.execute_script(
        "return document.querySelectorAll('#units tbody.below tr.unit').length")
    assert below + len(units) == 24                     # sorting kept the two sections

    # Only local files were requested, by the page itself and by the Performance API.
    made = requests_made(browser)
    ours = [url for doc, url in made if doc == page.as_uri()]
    assert len(ours) >= 1 + 24 + 2, made                # the page, its strips and charts
    assert all(urlparse(u).scheme in ("file", "data") for u in ours), ours
    assert not [u for _, u in made if urlparse(u).scheme in ("http", "https", "ws", "wss")], made
    resources = browser.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name);")
    assert all(urlparse(u).scheme in ("file", "data") for u in resources), resources

    browser.execute_script("window.scrollTo(0, 0);")
    shot = tmp_path / "report.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
