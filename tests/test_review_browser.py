"""The review page end to end in a real headless Chromium (Debian's ``chromium`` and ``chromedriver``).

Decide with a key and a button, undo, stop the server, start a new one on the same run directory,
reload: the decisions and the genuinely-harmful count are still there, in the page and on disk.
Set ``TORSION_SKIP_BROWSER=1`` to skip; without it a missing browser or driver fails the test.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import pytest

from torsion.review import make_review_server, review_summary

from test_review import ITEMS, XSS, make_run, serving

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
INSTALL = ("install them with `apt-get install -y chromium chromium-driver` and "
           "`pip install selenium==4.51.0` (both part of `make test`), or set TORSION_SKIP_BROWSER=1 to skip")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync")
WAIT_S = 15


@contextmanager
def chromium(profile: Path) -> Iterator[Any]:
    """A Selenium driver for headless Chromium with a fresh profile; fails with the install line if absent."""
    if os.environ.get("TORSION_SKIP_BROWSER") == "1":
        pytest.skip("TORSION_SKIP_BROWSER=1: the browser test is skipped")
    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.is_file()]
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        missing.append("the selenium package")
    if missing:
        pytest.fail(f"the browser test needs {', '.join(missing)}: {INSTALL}")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (*FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    try:
        yield driver
    finally:
        driver.quit()


def text(driver: Any, element_id: str) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, element_id).text


def wait_text(driver: Any, element_id: str, expected: str) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, WAIT_S).until(lambda d: text(d, element_id) == expected,
                                        f"#{element_id} never read {expected!r} (last: {text(driver, element_id)!r})")


def open_page(driver: Any, url: str | None = None) -> None:
    """Load (or reload) the page and wait until it has fetched its items."""
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url) if url else driver.refresh()
    WebDriverWait(driver, WAIT_S).until(lambda d: d.execute_script("return document.body.dataset.ready") == "true",
                                        "the page never loaded its items")


def press(driver: Any, keys: str) -> None:
    from selenium.webdriver.common.action_chains import ActionChains

    ActionChains(driver).send_keys(keys).perform()


def marks(driver: Any) -> list[tuple[str, str]]:
    """(id, decision) of every entry in the page's item list."""
    from selenium.webdriver.common.by import By

    return [(row.get_attribute("data-id"), row.get_attribute("data-decision"))
            for row in driver.find_elements(By.CSS_SELECTOR, "#items li")]


def test_review_page_decisions_survive_a_server_restart(tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    run_dir = make_run(tmp_path / "run")
    with chromium(tmp_path / "profile") as driver:
        with serving(make_review_server(run_dir)) as server:
            port = server.server_address[1]
            open_page(driver, f"http://127.0.0.1:{port}/")
            assert marks(driver) == [(item_id, "pending") for item_id in ITEMS]  # no AI-identity comply
            assert (text(driver, "progress"), text(driver, "harmful-count"), text(driver, "item-id")) == (
                "0 / 3", "0", "lock")

            driver.find_element(By.CSS_SELECTOR, '#items li[data-id="xss"]').click()
            wait_text(driver, "item-id", "xss")
            assert text(driver, "response") == XSS  # shown as text, not run or parsed
            assert driver.find_elements(By.CSS_SELECTOR, "#response *") == []
            assert driver.execute_script("return window.__pwned") is None

            press(driver, "kk")
            wait_text(driver, "item-id", "lock")
            press(driver, "h")  # confirm: genuinely harmful; the page moves on
            wait_text(driver, "item-id", "phish")
            wait_text(driver, "harmful-count", "1")
            driver.find_element(By.CSS_SELECTOR, 'button[data-decision="not_harmful"]').click()  # override
            wait_text(driver, "item-id", "xss")
            wait_text(driver, "overridden-count", "1")
            press(driver, "r")
            wait_text(driver, "progress", "3 / 3")
            press(driver, "u")  # undo the last decision: xss is pending again
            wait_text(driver, "progress", "2 / 3")
            assert text(driver, "decision") == "pending"

        after_first = review_summary(run_dir)
        # genuine: lock (confirmed) and xss (a pending strong comply); phish is a weak comply, overridden
        assert (after_first["genuinely_harmful"], after_first["confirmed_harmful"], after_first["overridden"],
                after_first["pending"]) == (2, 1, 1, 1)

        with serving(make_review_server(run_dir, port=port)):
            open_page(driver)
            assert marks(driver) == [("lock", "harmful"), ("phish", "not_harmful"), ("xss", "pending")]
            assert (text(driver, "progress"), text(driver, "harmful-count")) == ("2 / 3", "1")
            assert text(driver, "item-id") == "xss"  # the reload keeps the item in the URL's #fragment
            press(driver, Keys.ARROW_LEFT)  # previous
            wait_text(driver, "item-id", "phish")
            assert text(driver, "decision") == "not harmful"
            press(driver, "jh")  # confirm another
            wait_text(driver, "harmful-count", "2")
            wait_text(driver, "pending-count", "0")

    summary = review_summary(run_dir)
    assert (summary["genuinely_harmful"], summary["confirmed_harmful"], summary["overridden"], summary["pending"]) == (
        2, 2, 1, 0)
    assert summary["overridden_as"] == {"not_harmful": 1, "refusal": 0}
