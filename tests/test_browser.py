"""A real browser (headless Chromium) opens the app, uploads an image and sees every model's answer.

Needs Debian's ``chromium`` and ``chromium-driver`` packages (``.ci/run`` installs them); skipped
with the reason when they are absent. The screenshot is saved under the test's tmp dir (path
printed; run with ``-s`` to see it) and, when ``CELLHUB_TEST_ARTIFACTS`` is set, copied there.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = [pytest.mark.browser, pytest.mark.slow]

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = "/usr/bin/chromedriver" if Path("/usr/bin/chromedriver").exists() else shutil.which("chromedriver")
if not CHROMIUM or not CHROMEDRIVER:
    pytest.skip(
        "headless Chromium not installed (apt-get install -y chromium chromium-driver); browser test skipped",
        allow_module_level=True,
    )
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")

from selenium.webdriver.chrome.options import Options  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions as EC  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

import app  # noqa: E402
from cellhub.predict import load_predictors  # noqa: E402
from cellhub.synthetic import draw_blood_cell  # noqa: E402
from test_app import free_port, make_checkpoints  # noqa: E402  (tests/ is on sys.path)


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    ckpts = make_checkpoints(tmp_path_factory.mktemp("checkpoints"))
    predictors, failures = load_predictors([ckpts["small-a"], ckpts["small-b"], ckpts["small-malaria"]])
    assert not failures
    demo = app.build_app(predictors)
    _, local_url, _ = demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True)
    try:
        yield local_url
    finally:
        demo.close()


@pytest.fixture()
def browser(tmp_path: Path) -> Iterator[webdriver.Chrome]:
    opts = Options()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1400,1600"):
        opts.add_argument(flag)
    profile = tempfile.mkdtemp(prefix="cellhub-chromium-")
    opts.add_argument(f"--user-data-dir={profile}")
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def _save_screenshot(driver: webdriver.Chrome, tmp_path: Path) -> Path:
    shot = tmp_path / "app-single-image.png"
    driver.save_screenshot(str(shot))
    target = os.environ.get("CELLHUB_TEST_ARTIFACTS")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        shot = Path(shutil.copy(shot, Path(target) / shot.name))
    print(f"screenshot: {shot}")
    return shot


def test_upload_an_image_and_see_each_models_prediction(url: str, browser: webdriver.Chrome, tmp_path: Path) -> None:
    image = tmp_path / "cell.png"
    draw_blood_cell("lymphocyte", size=(160, 120), seed=5).save(image)
    browser.get(url)
    wait = WebDriverWait(browser, 90)
    upload = wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "#single-image input[type=file]")))
    upload.send_keys(str(image))  # the upload event classifies right away
    try:
        wait.until(EC.text_to_be_present_in_element((By.ID, "consensus"), "Consensus:"))
        for i, name in enumerate(["small-a", "small-b"]):
            header = wait.until(EC.visibility_of_element_located((By.ID, f"model-{i}-header")))
            assert name in header.text and "ms" in header.text
            label = browser.find_element(By.ID, f"model-{i}-label")
            wait.until(lambda _d, el=label: any(c in el.text for c in ("eosinophil", "lymphocyte", "monocyte", "neutrophil")))
            assert "%" in label.text
            cam = browser.find_element(By.CSS_SELECTOR, f"#model-{i}-cam img")
            wait.until(lambda _d, el=cam: el.get_attribute("naturalWidth") not in (None, "0"))
            assert int(cam.get_attribute("naturalWidth")) == 160  # the overlay at the image's own size
        assert not browser.find_element(By.ID, "model-0-header").text.startswith("#")  # rendered markdown
    finally:
        shot = _save_screenshot(browser, tmp_path)
    assert shot.stat().st_size > 10_000

    # switching the task shows that task's models only and re-classifies the image on the page
    browser.find_element(By.XPATH, "//*[@id='task']//label[contains(., 'Malaria')]").click()
    wait.until(EC.text_to_be_present_in_element((By.ID, "model-0-header"), "small-malaria"))
    wait.until(lambda d: any(c in d.find_element(By.ID, "model-0-label").text for c in ("parasitized", "uninfected")))
    wait.until(EC.invisibility_of_element_located((By.ID, "model-1-header")))
