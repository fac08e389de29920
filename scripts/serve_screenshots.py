"""Screenshots of the web page for the README: serves the demo model (``make demo`` first),
uploads the example whole slide (CMU-1-Small-Region, Aperio .svs) as a user, and saves the
home, upload, running, result and history pages seen in headless Chromium (Debian's chromium
and chromium-driver) to ``results/serve/screenshots/``; the result page also to
``docs/figures/serve_result.png`` (the README's picture).

Run: ``python scripts/serve_screenshots.py`` (about a minute).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import requests
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import WebDriverWait

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
from serve_load import ServerProcess  # noqa: E402

import lightning_streaming as ls  # noqa: E402

USER, PASSWORD = "pathologist", "screenshots only"


def browser(profile: str) -> webdriver.Chrome:
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1320,1050", f"--user-data-dir={profile}"):  # fmt: skip
        options.add_argument(flag)
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)


def main() -> None:
    checkpoint = REPO / "results" / "demo" / "model.ckpt"
    if not checkpoint.is_file():
        sys.exit("no results/demo/model.ckpt: run `make demo` first")
    slide = ls.example_slides(REPO / ".data").cmu_small_region
    out = REPO / "results" / "serve" / "screenshots"
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp, ServerProcess(
        checkpoint, "examples.slide_demo:SlideClassifier", Path(tmp) / "data", env={**os.environ, "PYTHONPATH": str(REPO)},
        cwd=REPO,
    ) as server:  # fmt: skip
        api = requests.Session()
        api.post(f"{server.url}/api/register", json={"username": USER, "password": PASSWORD}).raise_for_status()
        driver = browser(str(Path(tmp) / "chromium"))
        try:
            wait = WebDriverWait(driver, 300)
            driver.get(server.url + "/login")
            driver.find_element(By.NAME, "username").send_keys(USER)
            driver.find_element(By.NAME, "password").send_keys(PASSWORD)
            driver.find_element(By.CSS_SELECTOR, "form.card button[type=submit]").click()
            wait.until(ec.url_contains("/upload"))
            driver.save_screenshot(str(out / "serve_upload.png"))
            driver.find_element(By.NAME, "file").send_keys(str(slide))
            driver.find_element(By.CSS_SELECTOR, "form.card button[type=submit]").click()
            wait.until(ec.url_contains("/predictions/"))
            time.sleep(1.5)
            driver.save_screenshot(str(out / "serve_running.png"))
            wait.until(ec.visibility_of_element_located((By.ID, "label")))
            time.sleep(1)
            driver.save_screenshot(str(out / "serve_result.png"))
            driver.get(server.url + "/")
            driver.save_screenshot(str(out / "serve_home.png"))
            driver.get(server.url + "/history")
            driver.save_screenshot(str(out / "serve_history.png"))
        finally:
            driver.quit()
    shutil.copyfile(out / "serve_result.png", REPO / "docs" / "figures" / "serve_result.png")
    print(f"saved {', '.join(sorted(p.name for p in out.glob('serve_*.png')))} in {out}; the result page also in "
          "docs/figures/serve_result.png")


if __name__ == "__main__":
    main()
