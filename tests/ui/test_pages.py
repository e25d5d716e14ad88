"""The dashboard's pages as the API serves them: where they are, and the headers that keep them
to this origin. (tests/ui/test_dashboard.py drives them in a browser.)"""

from __future__ import annotations

import re

import httpx

from app.api.ui import STATIC


def test_the_root_and_ui_redirect_to_the_dashboard(server):
    for path in ("/", "/ui"):
        r = httpx.get(f"{server}{path}", follow_redirects=False)
        assert r.status_code == 307 and r.headers["location"] == "/ui/"


def test_the_page_and_its_assets_allow_nothing_from_elsewhere(server):
    page = httpx.get(f"{server}/ui/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "script-src 'self'" in csp and "unsafe-inline" not in csp
    # Every asset the page or a module names is served from here, with the same headers.
    names = set(re.findall(r'(?:src|href)="static/([\w.]+)"', page.text))
    for module in STATIC.glob("*.js"):
        names |= set(re.findall(r'from "\./([\w.]+)"', module.read_text()))
    assert {"app.js", "style.css", "api.js", "charts.js"} <= names
    for name in names:
        r = httpx.get(f"{server}/ui/static/{name}")
        assert r.status_code == 200, name
        assert r.headers["content-security-policy"] == csp and r.headers["x-content-type-options"] == "nosniff"
    # No page or script loads anything from another origin (the dashboard works offline).
    for path in STATIC.iterdir():
        assert not re.search(r"https?://", path.read_text().replace("http://www.w3.org/2000/svg", "")), path.name


def test_nothing_outside_the_static_folder_is_served(server):
    for path in ("/ui/static/../../api/ui.py", "/ui/static/%2e%2e/%2e%2e/main.py", "/ui/static/missing.js"):
        assert httpx.get(f"{server}{path}").status_code == 404, path
