"""`index web` and `index show --format html` in a real browser: Debian's headless Chromium driven by
Selenium through Debian's chromedriver (nothing downloaded). Search -> family -> detail on a store crawled
from the really trained tiny zoo over the Hub emulator; a hostile repo name that must stay text.

The browser is part of the test environment (`make test` / `.ci/run` install it when missing): without
it these tests FAIL, they never skip. A screenshot of the family view is left in tests/artifacts/.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from web_support import CHILDREN, HOSTILE, HOSTILE_CARD, ROOT, build_store, repo_path, run_index, running_web

from indexer.crawl import CrawlOptions, crawl
from indexer.hub_emulator import HubEmulator
from store.graph import family_of

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
# Headless as root in a container; no network chatter of the browser's own (sync, updates, QUIC probes)
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1400,1000")
WAIT_S = 60  # 2 shared cores: Chromium's first page can take a while


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.fail("headless Chromium is missing: apt-get install -y chromium chromium-driver "
                    "(`make test` and .ci/run install it)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (*FLAGS, f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(WAIT_S)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def crawled(tiny_ft_zoo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("web-crawled") / "home"
    with HubEmulator(tiny_ft_zoo) as emu:
        report = crawl(home, CrawlOptions(endpoint=emu.url, progress=False)).as_dict()
    assert report["indexed"] == 8 and not report["failed"], report
    return home


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_store(tmp_path_factory.mktemp("web-hostile") / "home")


def _grandchild(zoo: Path) -> str:
    with open(zoo / "truth.csv", newline="") as f:
        up = {row["child"]: row["parent"] for row in csv.DictReader(f)}
    return min(c for c, p in up.items() if p and up.get(p))


def _wait(driver: Any, script: str, expected: object = True) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, WAIT_S).until(lambda d: d.execute_script(script) == expected)


def _drawn(driver: Any) -> None:
    _wait(driver, "return document.body.getAttribute('data-state')", "drawn")


def _field(driver: Any, name: str) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, f'#detail dd[data-field="{name}"]').text


def _click_node(driver: Any, repo: str) -> None:
    """A real mouse click on the node, at the viewport point where cytoscape drew it on the canvas."""
    from selenium.webdriver.common.actions.action_builder import ActionBuilder
    from selenium.webdriver.common.by import By

    box = driver.find_element(By.ID, "cy")
    pos = driver.execute_script("return window.familyGraph.getElementById(arguments[0]).renderedPosition()", repo)
    driver.execute_script("var r = arguments[0].getBoundingClientRect();"  # the point itself into the viewport
                          "window.scrollTo(0, window.scrollY + r.top + arguments[1] - window.innerHeight / 2);",
                          box, pos["y"])
    # cytoscape caches where its canvas sits on the page: let the scroll land and the cache refresh
    driver.execute_async_script("var done = arguments[0]; window.familyGraph.resize();"
                                "requestAnimationFrame(function () { requestAnimationFrame(done); });")
    rect = driver.execute_script("return arguments[0].getBoundingClientRect()", box)
    click = ActionBuilder(driver)
    click.pointer_action.move_to_location(int(rect["left"] + pos["x"]), int(rect["top"] + pos["y"])).click()
    click.perform()
    _wait(driver, "var d = document.getElementById('detail'); "
                  "return d.getAttribute('data-selected') + '|' + d.getAttribute('data-state')", f"{repo}|ready")


def _drawn_inside(driver: Any) -> list[str]:
    """Ids of the nodes whose box lies inside the drawing area (drawn, not off-screen)."""
    return driver.execute_script("""
        var cy = window.familyGraph, w = cy.width(), h = cy.height();
        return cy.nodes().filter(function (n) {
          var b = n.renderedBoundingBox();
          return n.visible() && b.x1 >= 0 && b.y1 >= 0 && b.x2 <= w && b.y2 <= h && b.w > 10;
        }).map(function (n) { return n.id(); });""")


def test_search_then_family_then_detail(browser: Any, crawled: Path, tiny_ft_zoo: Path) -> None:
    from selenium.webdriver.common.by import By

    target = _grandchild(tiny_ft_zoo)
    family = family_of(crawled, target)
    parent = next(n.parent for n in family.nodes if n.repo_id == target)
    with running_web(crawled) as url:
        browser.get(url)
        assert browser.find_element(By.ID, "count-models").text == "8"
        # 1. search by a prefix of the name
        box = browser.find_element(By.ID, "search-input")
        box.send_keys(target.split("/")[1][:-1])
        browser.find_element(By.ID, "search-button").click()
        _wait(browser, "return document.querySelectorAll('#results a.result').length > 0")
        links = {a.text: a for a in browser.find_elements(By.CSS_SELECTOR, "#results a.result")}
        assert target in links
        # 2. its family, drawn
        links[target].click()
        _drawn(browser)
        assert browser.find_element(By.ID, "family-title").text == target
        ids = browser.execute_script("return window.familyGraph.nodes().map(function (n) { return n.id(); })")
        assert sorted(ids) == sorted(n.repo_id for n in family.nodes)
        assert sorted(_drawn_inside(browser)) == sorted(ids)
        edges = browser.execute_script("return window.familyGraph.edges('.lineage').map(function (e) {"
                                       " return [e.source().id(), e.target().id()]; })")
        assert sorted(map(tuple, edges)) == sorted((n.parent, n.repo_id) for n in family.nodes if n.parent)
        rows = browser.find_elements(By.CSS_SELECTOR, "#models tr[data-repo]")
        assert sorted(r.get_attribute("data-repo") for r in rows) == sorted(ids)
        # 3. click the parent in the picture: its detail
        _click_node(browser, parent)
        assert browser.find_element(By.ID, "detail-title").text == parent
        assert re.fullmatch(r"[0-9a-f]{40}", _field(browser, "revision"))
        assert int(_field(browser, "bytes_read").replace(",", "")) > 0
        assert _field(browser, "relation") in {"root", "finetune", "adapter", "quantized", "merge", "duplicate"}
        assert re.match(r"\d{4}-\d\d-\d\dT", _field(browser, "created_at"))
        assert " dims · " in _field(browser, "sketch") and "layers" in _field(browser, "sketch")
        assert target in _field(browser, "children").splitlines()
        assert _field(browser, "ancestry") != "" and "declared" not in _field(browser, "declared_base_model")
        ARTIFACTS.mkdir(exist_ok=True)
        browser.save_screenshot(str(ARTIFACTS / "family.png"))  # the family view with a detail open


def test_a_script_in_a_repo_name_renders_as_text(browser: Any, hostile: Path) -> None:
    from selenium.webdriver.common.by import By

    with running_web(hostile) as url:
        browser.get(url + "search?prefix=" + repo_path("<scr"))
        assert [a.text for a in browser.find_elements(By.CSS_SELECTOR, "#results a.result")] == [HOSTILE]
        browser.find_element(By.CSS_SELECTOR, "#results a.result").click()
        _drawn(browser)
        assert browser.find_element(By.ID, "family-title").text == HOSTILE
        assert browser.execute_script("return window.familyGraph.getElementById(arguments[0]).data('label')",
                                      HOSTILE).startswith(HOSTILE)
        _click_node(browser, HOSTILE)
        assert HOSTILE_CARD in _field(browser, "declared_base_model") and "disagrees" in _field(browser, "declared_base_model")
        assert browser.execute_script("return typeof window.__pwned") == "undefined"
        assert len(browser.find_elements(By.TAG_NAME, "script")) == 3 and not browser.find_elements(By.TAG_NAME, "img")
        # the large family: 30 children, 20 drawn, the rest one "10 more" box
        assert browser.execute_script("return window.familyGraph.nodes('.model').length") == 24
        assert browser.execute_script("return window.familyGraph.getElementById('+' + arguments[0]).data('label')",
                                      ROOT) == "… 10 more children (10 models)"


def test_unknown_repo_page_is_a_404_with_suggestions(browser: Any, hostile: Path) -> None:
    from selenium.webdriver.common.by import By

    with running_web(hostile) as url:
        browser.get(url + "family/zoo/bsae")
        assert "unknown model" in browser.find_element(By.ID, "error").text
        assert ROOT in [a.text for a in browser.find_elements(By.CSS_SELECTOR, "#suggestions a")]


def test_standalone_html_opens_offline(browser: Any, hostile: Path, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    done = run_index("show", CHILDREN[0], "--home", str(hostile), "--format", "html")
    assert done.returncode == 0, done.stderr
    page = tmp_path / "family.html"
    page.write_text(done.stdout, encoding="utf-8")
    browser.get(page.as_uri())
    _drawn(browser)
    assert browser.execute_script("return performance.getEntriesByType('resource').length") == 0  # fetched nothing
    assert browser.execute_script("return window.familyGraph.nodes('.model').length") == 24
    assert len(_drawn_inside(browser)) == 25  # and the "10 more" box
    _click_node(browser, CHILDREN[0])
    assert _field(browser, "relation") == "finetune" and _field(browser, "confidence") == "0.90"
    assert HOSTILE in _field(browser, "children").splitlines()
    assert browser.execute_script("return typeof window.__pwned") == "undefined"
    assert not browser.find_elements(By.TAG_NAME, "img")
