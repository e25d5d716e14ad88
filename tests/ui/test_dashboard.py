"""The dashboard in a real Chromium (Playwright driving Debian's chromium) against a live API, a real
training worker and a live inference process. Screenshots of the job page and the evaluation page
are written to tests/ui/screenshots/."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from app.domains.jobs.states import FINAL
from tests.conftest import _stop, start_inference
from tests.factories import all_events, create_job, demo_tasks, stored_adapter, uploaded_file_id, wait_for_job

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SCREENSHOTS = Path(__file__).parent / "screenshots"
TIMEOUT_MS = 30_000

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[dev]')")


@pytest.fixture(scope="module")
def browser() -> Iterator:
    if not Path(CHROMIUM).exists():
        pytest.skip("chromium is not installed: scripts/system-deps.sh installs it (as root, with apt-get)")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, server):
    """A fresh browser context (its own sessionStorage) whose page fails the test on any script error."""
    context = browser.new_context(base_url=server, viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(f"page error: {exc}"))
    # 4xx answers the page shows on purpose are logged by Chromium as console errors; scripts' own are not.
    page.on("console", lambda msg: msg.type == "error" and "Failed to load resource" not in msg.text
            and errors.append(f"console: {msg.text}"))
    yield page
    context.close()
    assert errors == []


def some_tasks(n: int, skip: int = 0) -> bytes:
    """n of the bundled MBPP-style tasks: a job on them takes seconds, however busy the machine."""
    return b"".join(demo_tasks().splitlines(keepends=True)[skip:skip + n])


def sign_in(page, key: str) -> None:
    page.goto("/ui/")
    page.fill("#api-key", key)
    page.click("#sign-in button[type=submit]")
    page.wait_for_selector("#nav:not([hidden])")


# The number of training-loss points the job page's chart draws, as a JavaScript expression.
TRAIN_POINTS = """document.querySelectorAll('#loss-chart g[data-series="train"] circle.point').length"""


def points(page, series: str) -> int:
    return page.locator(f'#loss-chart g[data-series="{series}"] circle.point').count()


def test_signing_in_checks_the_key_and_keeps_it_in_the_tab_only(page, api, make_team):
    _, key = make_team()
    page.goto("/")  # the root redirects to the dashboard
    assert page.url.endswith("/ui/")
    page.fill("#api-key", "tf_not_a_key")
    page.click("#sign-in button[type=submit]")
    error = page.wait_for_selector("#sign-in-status .error")
    assert "key" in error.inner_text().lower()
    assert page.is_hidden("#nav")

    page.fill("#api-key", key)
    page.click("#sign-in button[type=submit]")
    page.wait_for_selector("#jobs")
    assert page.evaluate("sessionStorage.getItem('tuneforge.apiKey')") == key
    assert page.evaluate("localStorage.length") == 0 and page.context.cookies() == []
    assert key not in page.url
    assert page.is_visible('[data-nav="keys"]')  # create_team's first key is an admin key

    member = api(key).post("/keys", json={"name": "member", "role": "member"}).json()["key"]
    page.click("#sign-out")
    page.wait_for_selector("#sign-in")
    assert page.evaluate("sessionStorage.getItem('tuneforge.apiKey')") is None
    sign_in(page, member)
    assert page.inner_text("#who") == "member key" and page.is_hidden('[data-nav="keys"]')


def test_a_bad_upload_shows_its_errors_by_line_and_stores_nothing(page, api, make_team, tmp_path):
    _, key = make_team()
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(good) + "\n{not json\n" + json.dumps(good) + "\n" + json.dumps({"messages": "x"}) + "\n")
    sign_in(page, key)
    page.goto("/ui/#/datasets")
    page.set_input_files("#upload-file", str(bad))
    page.click("#upload button[type=submit]")
    rows = page.locator("#upload-errors tr.line-error")
    rows.first.wait_for()
    assert [rows.nth(i).get_attribute("data-line") for i in range(rows.count())] == ["2", "4"]
    assert "line 2" in page.inner_text("#upload-status .error")
    assert api(key).get("/files").json()["data"] == []
    assert page.locator("#files tr[data-file]").count() == 0


def test_a_job_started_here_draws_its_loss_curve_as_the_events_arrive(page, server, api, make_team, worker):
    _, key = make_team()
    client = api(key)
    # 320 records, 40 steps an epoch: the job is still running when the page pauses it, however fast
    # the tiny model trains (32 records, 4 steps an epoch, had ended before the pause was acted on).
    file_id = uploaded_file_id(client, some_tasks(32) * 10)
    validation_id = uploaded_file_id(client, some_tasks(8, skip=32))
    sign_in(page, key)
    page.goto("/ui/#/jobs")
    # Other tests register other bases; the form's first is whichever the list gives first.
    page.select_option("#job-model", "tiny-llama")
    page.select_option("#job-training-file", file_id)
    page.select_option("#job-validation-file", validation_id)
    page.fill("#job-epochs", "4")  # long enough to be paused from the page before it ends
    page.fill("#job-suffix", "ui")
    page.fill("#job-checkpoint-every", "30")
    # Sample the number of plotted training points from the moment the job page draws its chart.
    page.click("#new-job button[type=submit]")
    page.wait_for_selector("#loss-chart")
    page.evaluate(f"() => {{ window.counts = []; setInterval(() => window.counts.push({TRAIN_POINTS}), 25); }}")
    job_id = page.url.rsplit("/", 1)[-1]
    assert job_id.startswith("ftjob-")

    def logged(key: str) -> list[dict]:
        """The job's metrics events that carry `key`."""
        return [e for e in all_events(client, job_id) if e["type"] == "metrics" and key in (e["data"] or {})]

    # The curve grows while the job runs: once the first point is drawn the job is paused from this
    # page, and the chart then holds exactly the points the job had logged, fewer than at its end.
    page.wait_for_function(f"() => {TRAIN_POINTS} > 0", timeout=120_000)
    page.click("#job-pause:not([disabled])")
    paused = wait_for_job(client, job_id, statuses={"paused", *FINAL}, timeout=120)
    assert paused["status"] == "paused", paused
    so_far = len(logged("train_loss"))
    page.wait_for_function(f"() => {TRAIN_POINTS} === {so_far}")
    page.click("#job-resume:not([disabled])")

    job = wait_for_job(client, job_id, timeout=300)
    assert job["status"] == "succeeded", job
    page.wait_for_function("() => document.getElementById('stream-mode').textContent === 'ended'")
    train, valid = logged("train_loss"), logged("valid_loss")
    page.wait_for_function(f"() => {TRAIN_POINTS} === {len(train)}")
    assert points(page, "train") == len(train) > so_far > 0 and points(page, "valid") == len(valid) == 4
    counts = page.evaluate("window.counts")
    assert counts == sorted(counts) and so_far in counts, counts
    # The live stream where the server has one (stream=true answers server-sent events), else polling.
    probe = httpx.get(f"{server}/v1/fine_tuning/jobs/{job_id}/events", params={"stream": "true"},
                      headers={"Authorization": f"Bearer {key}"}, timeout=30)
    streams = probe.headers.get("content-type", "").startswith("text/event-stream")
    assert page.get_attribute("#stream-mode", "data-via") == ("stream" if streams else "poll")
    assert page.locator("#lr-chart circle.point").count() == len(train)
    assert page.locator("#events tr").count() == len(all_events(client, job_id))
    checkpoints = client.get(f"/fine_tuning/jobs/{job_id}/checkpoints").json()["data"]
    assert checkpoints and job["spec"]["training"]["checkpoint_every_steps"] == 30
    rows = page.locator("#checkpoints tr[data-checkpoint]")
    assert [rows.nth(i).get_attribute("data-checkpoint") for i in range(rows.count())] == [c["id"] for c in checkpoints]
    assert page.is_disabled("#job-cancel") and page.is_disabled("#job-pause") and page.is_disabled("#job-resume")
    assert json.loads(page.inner_text("#job-spec")) == job["spec"]
    SCREENSHOTS.mkdir(exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / "job.png"), full_page=True)


def test_the_evaluation_page_shows_base_and_tuned_pass_at_1_as_bars(page, api, make_team, worker):
    _, key = make_team()
    client = api(key)
    tasks = uploaded_file_id(client, some_tasks(16))
    job = create_job(client, tasks, hyperparameters={"n_epochs": 1},
                     eval={"tasks": tasks, "limit": 4, "max_tokens": 32, "timeout_seconds": 5})
    done = wait_for_job(client, job["id"], timeout=600)
    assert done["status"] == "succeeded", done
    report = done["usage"]["evaluation"]
    sign_in(page, key)
    page.goto(f"/ui/#/jobs/{job['id']}")
    page.click("#evaluation-link")
    page.wait_for_selector("#pass-chart g.bar-tuned")
    for role in ("base", "tuned"):
        shown = float(page.get_attribute(f"#pass-chart g.bar-{role}", "data-value"))
        assert shown == pytest.approx(report[role]["pass_at_k"]["1"])
        section = page.locator(f'section[data-role="{role}"]')
        section.locator("tr.result").first.wait_for()
        assert section.locator("tr.result").count() == 4
        assert section.locator("pre.program").count() == 4
    assert page.locator("#forgetting dd").nth(2).inner_text() != "—"
    SCREENSHOTS.mkdir(exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / "evaluation.png"), full_page=True)


@pytest.fixture(scope="module")
def inference(services_env, tiny_model) -> Iterator[str]:
    log = Path(services_env["TUNEFORGE_DATA_DIR"]) / "inference-ui.log"
    proc, url = start_inference(services_env, log, "tiny-llama", timeout=180)
    yield url
    _stop(proc)


def test_the_playground_streams_a_chat_answer_from_the_api(page, server, make_team, inference):
    _, key = make_team()
    question = "Write a function to add two numbers."
    client = openai.OpenAI(base_url=f"{server}/v1", api_key=key)
    expected = client.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": question}],
                                              max_tokens=24, temperature=0).choices[0].message.content
    assert expected
    sign_in(page, key)
    page.goto("/ui/#/playground")
    page.select_option("#chat-model", "tiny-llama")
    page.fill("#chat-max-tokens", "24")
    page.fill("#chat-input", question)
    page.evaluate("""() => { window.lengths = [];
        new MutationObserver(() => { const a = document.querySelector('#chat-thread .role-assistant .text');
            if (a) window.lengths.push(a.textContent.length); })
          .observe(document.getElementById('chat-thread'), {subtree: true, childList: true, characterData: true}); }""")
    page.click("#chat-send")
    page.wait_for_selector("#chat-thread .role-assistant[data-done]")
    assert page.inner_text("#chat-status") == ""
    assert page.text_content("#chat-thread .role-assistant .text") == expected
    # Drawn as it streamed: the answer was shown at more than one length before the last.
    assert len({n for n in page.evaluate("window.lengths") if 0 < n < len(expected)}) >= 1


def test_team_b_never_sees_team_a_job(page, server, api, make_team, tiny_model):
    _, key_a = make_team()
    _, key_b = make_team()
    client_a = api(key_a)
    job = create_job(client_a, uploaded_file_id(client_a), suffix="secret-of-a",
                     metadata={"owner": "team-a-only"})
    sign_in(page, key_a)
    page.wait_for_selector(f'#jobs tr[data-job="{job["id"]}"]')

    page.click("#sign-out")
    sign_in(page, key_b)
    page.wait_for_selector("#jobs")
    assert page.locator("#jobs tr[data-job]").count() == 0
    assert job["id"] not in page.content()
    page.goto(f"/ui/#/jobs/{job['id']}")
    error = page.wait_for_selector("#view .error")
    assert error.inner_text().startswith("No such fine-tuning job") and page.locator("#job-facts").count() == 0
    assert "secret-of-a" not in page.content() and "team-a-only" not in page.content()
    # Nor through any page that lists what a team owns.
    for hash_ in ("#/datasets", "#/adapters", "#/evaluations"):
        page.goto(f"/ui/{hash_}")
        page.wait_for_selector("#view h1")
        page.wait_for_load_state("networkidle")
        assert job["id"] not in page.content() and job["training_file"] not in page.content()
    assert httpx.get(f"{server}/v1/fine_tuning/jobs/{job['id']}",
                     headers={"Authorization": f"Bearer {key_b}"}).status_code == 404


def test_the_other_pages_show_the_team_s_files_adapters_quotas_and_keys(page, api, make_team, tmp_path, tiny_model):
    team_id, key = make_team()
    client = api(key)
    file_id = uploaded_file_id(client)
    archive = tmp_path / "adapter.tar.gz"
    archive.write_bytes(b"an adapter archive's bytes")
    adapter_id = stored_adapter(team_id, archive)
    sign_in(page, key)

    page.goto(f"/ui/#/datasets/{file_id}")
    page.locator("#preview .record").first.wait_for()
    assert page.locator("#preview .record").count() == 20
    assert "Write a function to add two numbers." in page.inner_text("#preview .record >> nth=0")

    page.goto("/ui/#/adapters")
    link = page.locator(f'a.download[data-adapter="{adapter_id}"]')
    with page.expect_download() as download:
        link.click()
    assert Path(download.value.path()).read_bytes() == archive.read_bytes()
    assert link.get_attribute("href").startswith("blob:")  # fetched with the key, never a URL holding it

    page.goto("/ui/#/quotas")
    assert "1 of" in page.inner_text("#quotas")  # the one file uploaded above

    page.goto("/ui/#/keys")
    page.locator("#keys tr[data-key]").first.wait_for()
    page.fill("#key-name", "ci")
    page.click("#new-key button[type=submit]")
    created = page.inner_text("#new-key-value")
    page.wait_for_selector("#keys tr[data-key] >> nth=1")
    assert api(created).get("/models").status_code == 200
    assert [k["name"] for k in client.get("/keys").json()["data"]].count("ci") == 1

    page.goto("/ui/#/evaluations")
    page.wait_for_selector("#view h1")
    assert "No evaluations yet." in page.inner_text("#view")
