"""A person's visit, in a real browser: headless Chromium (Debian's chromium and
chromium-driver, driven by Selenium) registers, logs out, logs in, uploads the example
slide region as a PNG, waits for the result, and sees the class, the probabilities and the
heatmap overlay with its controls. Screenshots go to results/serve/screenshots/."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from serve_helpers import PASSWORD, LiveServer, real_app, region_png

REPO = Path(__file__).resolve().parent.parent
SHOTS = REPO / "results" / "serve" / "screenshots"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)),
        reason="needs Debian's chromium and chromium-driver (.ci/run installs them with apt-get: "
        "apt-get install -y chromium chromium-driver)",
    ),
]


@pytest.fixture
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-quic",
                 "--window-size=1320,1100", f"--user-data-dir={tmp_path / 'chromium'}"):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def test_register_log_in_upload_and_read_the_result(browser, example_slides, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    SHOTS.mkdir(parents=True, exist_ok=True)
    app, classes = real_app(tmp_path / "data")
    image = region_png(example_slides.cmu_small_region, app, tmp_path / "cmu_small_region.png")
    wait = WebDriverWait(browser, 180)

    def click_and_load(selector: str, by: str = By.CSS_SELECTOR) -> None:
        """Click and wait until the next page has replaced this one, so that no wait below
        reads an element of the page being left (Chromium then answers "Node with given id
        does not belong to the document", which WebDriverWait does not retry)."""
        page = browser.find_element(By.TAG_NAME, "main")
        browser.find_element(by, selector).click()
        wait.until(ec.staleness_of(page))

    def fill(fields: dict[str, str]) -> None:
        for name, value in fields.items():
            element = browser.find_element(By.NAME, name)
            element.clear()
            element.send_keys(value)

    with LiveServer(app) as live:
        browser.get(live.url + "/")
        assert "What this model does" in browser.page_source
        for name in classes:
            assert name in browser.find_element(By.CSS_SELECTOR, "dl.facts").text
        browser.save_screenshot(str(SHOTS / "home.png"))

        click_and_load("Register", By.LINK_TEXT)
        fill({"username": "pathologist", "password": PASSWORD, "confirm": PASSWORD})
        click_and_load("form.card button[type=submit]")
        wait.until(ec.url_contains("/upload"))
        click_and_load("header button.link")  # log out
        wait.until(ec.text_to_be_present_in_element((By.CSS_SELECTOR, "main"), "You have logged out."))

        click_and_load("Log in", By.LINK_TEXT)
        fill({"username": "pathologist", "password": "not the password"})
        click_and_load("form.card button[type=submit]")
        wait.until(ec.text_to_be_present_in_element((By.CSS_SELECTOR, "form.card"), "Wrong user name or password."))
        fill({"username": "pathologist", "password": PASSWORD})
        click_and_load("form.card button[type=submit]")
        wait.until(ec.url_contains("/upload"))
        browser.save_screenshot(str(SHOTS / "upload.png"))

        browser.find_element(By.NAME, "file").send_keys(str(image))
        click_and_load("form.card button[type=submit]")
        wait.until(ec.url_contains("/predictions/"))
        label = wait.until(ec.visibility_of_element_located((By.ID, "label"))).text
        assert label in classes

        rows = browser.find_elements(By.CSS_SELECTOR, "#probabilities .row")
        shown = {row.find_element(By.CSS_SELECTOR, ".name").text: row.find_element(By.CSS_SELECTOR, ".num").text
                 for row in rows}  # fmt: skip
        assert set(shown) == set(classes) and all(value.endswith("%") for value in shown.values())
        assert abs(sum(float(value[:-1]) for value in shown.values()) - 100) < 0.5
        assert max(shown, key=lambda name: float(shown[name][:-1])) == label

        figure = browser.find_element(By.CSS_SELECTOR, "figure.layers:not(.hidden)")
        base, heat = figure.find_element(By.CSS_SELECTOR, "img.base"), figure.find_element(By.CSS_SELECTOR, "img.heat")
        loaded = "return arguments[0].complete && arguments[0].naturalWidth > 0"
        wait.until(lambda _: browser.execute_script(loaded, base) and browser.execute_script(loaded, heat))
        assert heat.is_displayed() and heat.value_of_css_property("opacity") == "0.5"
        browser.find_element(By.CSS_SELECTOR, ".legend .ramp")
        browser.save_screenshot(str(SHOTS / "result.png"))

        slider = browser.find_element(By.ID, "opacity")
        browser.execute_script("arguments[0].value = 80; arguments[0].dispatchEvent(new Event('input'))", slider)
        assert heat.value_of_css_property("opacity") == "0.8"
        assert browser.find_element(By.ID, "opacity-value").text == "80%"
        browser.find_element(By.ID, "show").click()
        assert not heat.is_displayed()
        browser.find_element(By.ID, "show").click()
        assert heat.is_displayed()

        click_and_load("My results", By.LINK_TEXT)
        wait.until(ec.text_to_be_present_in_element((By.CSS_SELECTOR, "table.history"), "cmu_small_region.png"))
        browser.save_screenshot(str(SHOTS / "history.png"))
