"""The chat page at `/`, in a real browser (headless Chromium through selenium and chromedriver)
against a live `dsv4 serve` of the selftest's tiny model.

The tests run in order on one page, as a user would: give the API key the page asks for, get a
streamed reply with its reasoning folded, stop a reply that would run on (and see the server stop
generating it), see an error the server sent, and see HTML in messages shown as text. The page's
`fetch` is wrapped (never the page itself) to add request fields the random model needs (a logit
bias that keeps it from ending, a small `max_tokens`) and, for the HTML check, to answer with a
stream whose text is chosen. A screenshot of the conversation is saved in the test's temp dir.
"""

from __future__ import annotations

import json
import shutil

import httpx
import pytest
from test_hostile import CHAT, KEY, MODEL_ID, SPECIALS, start_server, stop_server

webdriver = pytest.importorskip("selenium.webdriver",
                                reason="selenium is not installed (pip install selenium)")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and DRIVER), reason="needs Chromium and chromedriver (Debian: apt-get install chromium "
                                      "chromium-driver; .ci/run installs them)")

# A context so long that a reply left running would take minutes: the stop test can tell.
CONTEXT = 32768
WAIT = 60  # seconds a step may take on a slow, shared machine before the test fails

# Wraps the page's fetch: records each chat request, merges `window.extra` into its body, and
# answers with `window.fake` (an SSE body) instead of the server when that is set.
WRAP_FETCH = """
const real = window.fetch.bind(window);
window.sent = [];
window.fetch = (url, init) => {
  if (String(url).endsWith('/chat/completions')) {
    let body = JSON.parse(init.body);
    if (window.extra) body = Object.assign(body, window.extra);
    window.sent.push({url: String(url), headers: init.headers, body: body});
    init = Object.assign({}, init, {body: JSON.stringify(body)});
    if (window.fake) {
      const text = window.fake;
      window.fake = null;
      return Promise.resolve(new Response(text, {headers: {'Content-Type': 'text/event-stream'}}));
    }
  }
  return real(url, init);
};
"""


@pytest.fixture(scope="module")
def server(selftest_model, tmp_path_factory):
    log = tmp_path_factory.mktemp("chat-page") / "server.log"
    # One reply at a time: a request waits behind one still generating.
    proc, url = start_server(selftest_model, log, "--max-context", str(CONTEXT), "--max-batch", "1")
    assert url, f"the server did not start:\n{log.read_text(errors='replace')}"
    yield url
    stop_server(proc)


@pytest.fixture(scope="module")
def page(server):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--no-proxy-server",
                "--window-size=1000,1000", "--disable-gpu"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=DRIVER))
    driver.get(server + "/")
    driver.execute_script(WRAP_FETCH)
    yield driver
    driver.quit()


def wait(driver, condition, what: str):
    return WebDriverWait(driver, WAIT).until(lambda d: condition(), message=f"waited {WAIT} s for {what}")


def find(driver, css: str):
    return driver.find_element(By.CSS_SELECTOR, css)


def messages(driver, kind: str = "") -> list:
    return driver.find_elements(By.CSS_SELECTOR, f"#log .msg{'.' + kind if kind else ''}")


def say(driver, text: str):
    box = find(driver, "#input")
    wait(driver, box.is_enabled, "the input to be free")
    box.send_keys(text)
    find(driver, "#send").click()


def idle(driver) -> bool:
    return find(driver, "#send").is_displayed() and not find(driver, "#stop").is_displayed()


def test_the_page_is_served_without_a_key_and_asks_for_one(page, server):
    r = httpx.get(server + "/", trust_env=False)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in r.headers["content-security-policy"]
    assert "<script src" not in r.text and "http" not in r.text.split("<script>")[1]  # nothing from elsewhere
    wait(page, find(page, "#keybar").is_displayed, "the key bar")
    assert find(page, "#keywhy").text == "This server needs an API key."
    find(page, "#key").send_keys("wrong")
    find(page, "#keybar button").click()
    wait(page, lambda: find(page, "#keywhy").text == "Incorrect API key provided.", "the server's refusal")
    find(page, "#key").send_keys(KEY)
    find(page, "#keybar button").click()
    wait(page, lambda: find(page, "#model").text == MODEL_ID, "the model's name")
    assert not find(page, "#keybar").is_displayed()
    assert page.execute_script("return sessionStorage.getItem('dsv4-api-key')") == KEY


def test_a_reply_streams_in_with_its_reasoning_folded(page):
    # No special token, so the reasoning cannot end early (or at once): 24 tokens of it.
    page.execute_script(f"window.extra = {{max_tokens: 24, seed: 0, logit_bias: {json.dumps(SPECIALS)}}}")
    say(page, "Hello there")
    wait(page, lambda: len(messages(page, "assistant")) == 1 and idle(page), "the reply")
    sent = page.execute_script("return window.sent")[-1]
    assert sent["url"].endswith("/v1/chat/completions")
    assert sent["headers"] == {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"}
    body = sent["body"]
    assert body["stream"] is True and body["model"] == MODEL_ID
    assert body["thinking"] == {"type": "enabled"} and body["reasoning_effort"] == "high"
    assert body["messages"] == [{"role": "user", "content": "Hello there"}]
    reply = messages(page, "assistant")[0]
    folded = reply.find_element(By.TAG_NAME, "details")
    thought = reply.find_element(By.CSS_SELECTOR, ".thought").get_attribute("textContent")
    assert thought and folded.get_attribute("open") is None  # thinking is on: the reasoning came, folded
    assert folded.find_element(By.TAG_NAME, "summary").text == f"Thinking ({len(thought)} characters)"
    assert reply.find_element(By.CSS_SELECTOR, ".note").text == "stopped at the length limit"


def test_stop_ends_the_reply_and_the_server_stops_generating(page, server):
    find(page, "#thinking").click()
    assert not find(page, "#effort").is_enabled()
    # No special token can be sampled, so no EOS: this reply would fill the 32K context.
    page.execute_script(f"window.extra = {{logit_bias: {json.dumps(SPECIALS)}}}")
    say(page, "Tell me a long story")
    reply = messages(page, "assistant")[-1]
    text = reply.find_element(By.CSS_SELECTOR, ".text")
    wait(page, lambda: len(text.get_attribute("textContent")) >= 20, "the reply to stream in")
    assert find(page, "#stop").is_displayed() and not find(page, "#input").is_enabled()
    find(page, "#stop").click()
    wait(page, lambda: idle(page), "the page to stop")
    assert reply.find_element(By.CSS_SELECTOR, ".note").text == "stopped"
    body = page.execute_script("return window.sent")[-1]["body"]
    assert body["thinking"] == {"type": "disabled"} and "reasoning_effort" not in body
    first = messages(page, "assistant")[0].find_element(By.CSS_SELECTOR, ".text").get_attribute("textContent")
    assert body["messages"] == [{"role": "user", "content": "Hello there"},
                                {"role": "assistant", "content": first},
                                {"role": "user", "content": "Tell me a long story"}]
    # The server serves one reply at a time: this one is answered only once the stopped one has
    # stopped generating (left running, it would take minutes).
    r = httpx.post(server + CHAT, headers={"Authorization": f"Bearer {KEY}"}, timeout=WAIT, trust_env=False,
                   json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                         "thinking": {"type": "disabled"}})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1


def test_an_error_shows_its_message_and_gives_the_text_back(page):
    page.execute_script("window.extra = {temperature: 5}")
    say(page, "Too hot")
    wait(page, lambda: messages(page, "error"), "the error")
    error = messages(page, "error")[-1].text
    assert "temperature" in error and "less than or equal to 2" in error, error
    assert find(page, "#input").get_attribute("value") == "Too hot"
    assert [m.text for m in messages(page, "user")][-1] == "Tell me a long story"  # the turn was dropped
    find(page, "#input").clear()


def test_html_in_messages_is_shown_as_text(page, tmp_path):
    typed = '<script>window.pwned = 1</script><img src=x onerror="window.pwned = 2">'
    reasoning = '<img src=x onerror="window.pwned = 3">'
    content = "<script>window.pwned = 4</script><b>not bold</b> & done"
    events = [{"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
              {"choices": [{"index": 0, "delta": {"reasoning_content": reasoning}}]},
              {"choices": [{"index": 0, "delta": {"content": content[:20]}}]},
              {"choices": [{"index": 0, "delta": {"content": content[20:]}, "finish_reason": "stop"}]}]
    stream = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
    page.execute_script("window.extra = null; window.fake = arguments[0]", stream)
    say(page, typed)
    wait(page, lambda: len(messages(page, "assistant")) == 3 and idle(page), "the reply")
    assert messages(page, "user")[-1].get_attribute("textContent") == typed
    reply = messages(page, "assistant")[-1]
    assert reply.find_element(By.CSS_SELECTOR, ".text").get_attribute("textContent") == content
    assert reply.find_element(By.CSS_SELECTOR, ".thought").get_attribute("textContent") == reasoning
    assert page.find_elements(By.CSS_SELECTOR, "#log script, #log img, #log b") == []
    assert page.execute_script("return window.pwned === undefined")
    page.save_screenshot(str(tmp_path / "chat.png"))
    assert (tmp_path / "chat.png").stat().st_size > 0


def test_new_chat_starts_over(page):
    find(page, "#clear").click()
    assert messages(page) == [] and find(page, "#hint").is_displayed()
    done = {"choices": [{"index": 0, "delta": {"content": "ok"}, "finish_reason": "stop"}]}
    page.execute_script("window.fake = arguments[0]", f"data: {json.dumps(done)}\n\ndata: [DONE]\n\n")
    say(page, "Again")
    wait(page, lambda: len(messages(page, "assistant")) == 1 and idle(page), "the reply")
    assert page.execute_script("return window.sent")[-1]["body"]["messages"] == [
        {"role": "user", "content": "Again"}]
    assert messages(page, "assistant")[0].text == "ok"
