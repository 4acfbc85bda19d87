"""The sandbox console in a real browser: headless Chromium against ``wecombot dev``.

``wecombot dev`` runs as a subprocess with no settings at all (sandbox mode, offline
model), its own data dir and free ports. The page is driven as a person would: pick a
UserID, type, press Enter; every wait is for something to appear on the page (Playwright
polls the DOM with a deadline), never a sleep.

Chromium comes from Debian (``apt-get install chromium``; Playwright's own browser
download does not work here). Without it the tests are skipped locally with the reason,
and fail under CI, whose .ci/run installs it. ``WECOMBOT_CONSOLE_SCREENSHOT=docs/console.png``
also writes the screenshot used by the README.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.conftest import free_port
from tests.devprocess import DevProcess, Output

if TYPE_CHECKING:
    from playwright.sync_api import BrowserContext, Page

pytestmark = [pytest.mark.browser, pytest.mark.timeout(180)]

CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]
WAIT_MS = 30_000  # generous for 2 shared cores; a pass takes a fraction of it


def _chromium() -> str | None:
    for candidate in (
        os.environ.get("WECOMBOT_CHROMIUM"),
        "/usr/bin/chromium",
        shutil.which("chromium"),
        shutil.which("chromium-browser"),
    ):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


def _missing(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{reason} — .ci/run installs it, so CI must have it")
    pytest.skip(reason)


@dataclass
class Dev:
    process: DevProcess
    out: Output
    url: str


@pytest.fixture(scope="module")
def dev(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dev]:
    process = DevProcess(
        tmp_path_factory.mktemp("console"),
        GATEWAY_PORT=str(free_port()),
        WECOMBOT_CONSOLE_PORT=str(free_port()),
        WECOMBOT_HEALTH_PORT="0",
    )
    try:
        url = process.out.wait_for(r"console: (http://127\.0\.0\.1:\d+/)").group(1)
        yield Dev(process, process.out, url)
    finally:
        # Open event streams must not hold up the shutdown: fails past 10 s.
        code = process.stop(timeout=10)
    assert code == 0, process.out.tail()


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrowserContext]:
    executable = _chromium()
    if executable is None:
        _missing("Chromium is not installed (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("the playwright package is not installed (make install)")
    profile = tmp_path_factory.mktemp("chromium-profile")  # a fresh --user-data-dir
    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(profile),
            executable_path=executable,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1360, "height": 820},
            locale="zh-CN",
        )
        try:
            yield context
        finally:
            context.close()


@pytest.fixture
def page(browser: BrowserContext, dev: Dev) -> Iterator[Page]:  # no dev without a browser
    from playwright.sync_api import expect

    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(dev.url)
    expect(page.locator("#gateway")).to_have_attribute("data-state", "ready", timeout=WAIT_MS)
    yield page
    page.close()
    assert errors == [], f"JavaScript errors on the page: {errors}"


def chat_as(page: Page, user: str) -> None:
    from playwright.sync_api import expect

    page.fill("#user-input", user)
    page.press("#user-input", "Enter")
    expect(page.locator("#chat-title")).to_have_text(user)


def say(page: Page, text: str) -> None:
    page.fill("#text", text)
    page.press("#text", "Enter")


def rows(user: str, kind: str) -> str:
    return f'#event-list li[data-user="{user}"][data-type="{kind}"]'


def test_a_message_is_answered_through_the_real_path_and_its_events_show(page: Page) -> None:
    from playwright.sync_api import expect

    expect(page.locator("#mode")).to_contain_text("SANDBOX")
    expect(page.locator("#model")).to_contain_text("OFFLINE")
    chat_as(page, "zhao.yi")
    say(page, "你好，wecombot！Hello from the browser 👋")

    mine = page.locator('.thread[data-user="zhao.yi"] .msg.mine').last
    expect(mine.locator(".bubble")).to_have_text("你好，wecombot！Hello from the browser 👋")
    expect(mine.locator(".status")).to_contain_text("gateway 200", timeout=WAIT_MS)
    expect(mine.locator(".status")).to_contain_text(re.compile(r"stored as seq \d+"))
    reply = page.locator('.thread[data-user="zhao.yi"] .msg.bot .bubble').last
    expect(reply).to_contain_text(
        "[offline model] you said: 你好，wecombot！Hello from the browser 👋", timeout=WAIT_MS
    )
    expect(page.locator('.thread[data-user="zhao.yi"] .msg.bot .sender').last).to_contain_text(
        "offline model"
    )
    # The conversation's events, as JetStream appended them, in order, with their ids.
    for kind in ("MessageReceived", "ReplyGenerated", "PartDelivered", "ReplyDelivered"):
        expect(page.locator(rows("zhao.yi", kind))).to_have_count(1, timeout=WAIT_MS)
    types = page.locator('#event-list li[data-user="zhao.yi"][data-kind="event"]')
    assert types.evaluate_all("els => els.map(e => e.dataset.type)") == [
        "MessageReceived",
        "ReplyGenerated",
        "PartDelivered",
        "ReplyDelivered",
    ]
    received = page.locator(rows("zhao.yi", "MessageReceived"))
    expect(received).to_contain_text("你好，wecombot！")
    expect(received.locator(".ev-ids")).to_contain_text(re.compile(r"id \w{8}… · msg \d+"))
    expect(received.locator(".ev-seq")).to_have_text(re.compile(r"#\d+"))
    # The reply went through the simulated WeCom API: the call is listed too.
    expect(
        page.locator('#event-list li[data-kind="api"][data-type="message/send"]').last
    ).to_contain_text("ok · msgid sim-")


def test_a_long_reply_arrives_in_parts(page: Page) -> None:
    from playwright.sync_api import expect

    chat_as(page, "li.si")
    sentence = "长回复要按段落和句子拆分，每段不超过两千零四十八字节。"
    say(page, "请把这段话原样复述。" + sentence * 40)
    bubbles = page.locator('.thread[data-user="li.si"] .msg.bot .bubble')
    expect(page.locator(rows("li.si", "ReplyDelivered"))).to_contain_text(
        "2 parts delivered", timeout=WAIT_MS
    )
    expect(bubbles).to_have_count(2)
    expect(bubbles.nth(0).locator(".part")).to_have_text("part 1/2")
    expect(bubbles.nth(1).locator(".part")).to_have_text("part 2/2")
    expect(page.locator(rows("li.si", "PartDelivered"))).to_have_count(2)


def test_the_apps_menu_runs_its_commands(page: Page) -> None:
    """The page's custom menu: a click with the item's key, which the llm runs as typed
    (it clears the memory; the help lists the commands)."""
    from playwright.sync_api import expect

    chat_as(page, "menu.user")
    page.click('#menu button[data-key="/help"]')
    mine = page.locator('.thread[data-user="menu.user"] .msg.mine').last
    expect(mine.locator(".bubble")).to_have_text("⟨event: click /help⟩")
    bot = page.locator('.thread[data-user="menu.user"] .msg.bot .bubble')
    expect(bot.last).to_contain_text("/reset", timeout=WAIT_MS)
    expect(page.locator(rows("menu.user", "MessageReceived"))).to_contain_text("event click /help")
    page.click('#menu button[data-key="/reset"]')
    expect(page.locator(rows("menu.user", "ConversationReset"))).to_have_count(1, timeout=WAIT_MS)
    expect(bot).to_have_count(2, timeout=WAIT_MS)


def test_a_double_clicked_menu_item_leaves_the_next_event_its_own(page: Page) -> None:
    """Two clicks in one second are one event to WeCom (same user, time and fields):
    JetStream kept one. The page matched events to its bubbles in order, so the second
    click's bubble took the next click's event and that one stayed unstored."""
    from playwright.sync_api import expect

    chat_as(page, "double.click")
    help_item = page.locator('#menu button[data-key="/help"]')
    help_item.dblclick()
    mine = page.locator('.thread[data-user="double.click"] .msg.mine')
    expect(mine).to_have_count(2)
    expect(mine.first.locator(".status")).to_contain_text("stored as seq", timeout=WAIT_MS)
    expect(mine.nth(1).locator(".status")).to_contain_text("✓ gateway 200", timeout=WAIT_MS)
    # A later second: another event to WeCom (by the clock the callbacks are stamped with)
    page.wait_for_function("s => Date.now() / 1000 >= s", arg=int(time.time()) + 1)
    help_item.click()
    expect(mine).to_have_count(3)
    received = page.locator(rows("double.click", "MessageReceived"))
    expect(mine.last.locator(".status")).to_contain_text("stored as seq", timeout=WAIT_MS)
    seqs = [text.removeprefix("#") for text in received.locator(".ev-seq").all_text_contents()]
    assert f"stored as seq {seqs[-1]}" in mine.last.locator(".status").inner_text()
    if len(seqs) == 2:  # the double click was one event (not two across a second)
        expect(mine.nth(1).locator(".status")).to_contain_text("JetStream kept one")


def test_a_message_the_llm_leaves_unanswered_ends_its_typing_bubble(page: Page) -> None:
    """Over the rate (10 a minute by default), the first message gets the llm's notice
    and the next none at all: its "…" bubble stayed for ever, and after a reload."""
    from playwright.sync_api import expect

    chat_as(page, "fast.typist")
    for i in range(12):
        say(page, f"第 {i + 1} 条")
    notices = page.locator('.thread[data-user="fast.typist"] .notice')
    expect(notices).to_contain_text(
        "No reply to this one: over LLM_USER_RATE_PER_MINUTE (10)", timeout=WAIT_MS
    )
    expect(page.locator(rows("fast.typist", "ReplyDelivered"))).to_have_count(11, timeout=WAIT_MS)
    typing = page.locator('.thread[data-user="fast.typist"] .typing-row')
    expect(typing).to_have_count(0)
    page.reload()  # the page replays the session: still no bubble
    chat_as(page, "fast.typist")
    expect(page.locator('.thread[data-user="fast.typist"] .notice')).to_have_count(1)
    expect(typing).to_have_count(0)


def test_switches_make_wecom_misbehave(page: Page) -> None:
    from playwright.sync_api import expect

    chat_as(page, "wang.wu")
    bot = page.locator('.thread[data-user="wang.wu"] .msg.bot .bubble')
    sends = page.locator('#event-list li[data-kind="api"][data-user="wang.wu"]')

    # Expired tokens: message/send answers 42001, the token service fetches a new one.
    page.click("#expire")
    expect(page.locator('#event-list li[data-kind="switch"]').last).to_contain_text("expired")
    say(page, "after the token expired")
    expect(bot.last).to_contain_text("after the token expired", timeout=WAIT_MS)
    expect(sends.filter(has_text="errcode 42001")).to_have_count(1)
    expect(
        page.locator('#event-list li[data-kind="api"][data-type="gettoken"]').last
    ).to_contain_text("ok")

    # A transient errcode, twice: the sender retries and the reply still arrives once.
    page.select_option("#fail-code", "-1")
    page.fill("#fail-times", "2")
    page.click("#inject")
    expect(page.locator("#stats")).to_contain_text("pending failures: 2× -1")
    say(page, "系统繁忙时也要送达")
    expect(bot.last).to_contain_text("系统繁忙时也要送达", timeout=WAIT_MS)
    expect(sends.filter(has_text="errcode -1")).to_have_count(2)
    expect(page.locator("#stats")).not_to_contain_text("pending failures")

    # A permanent errcode: the reply fails for good, and the page says why.
    page.select_option("#fail-code", "81013")
    page.fill("#fail-times", "1")
    page.click("#inject")
    say(page, "this one cannot be delivered")
    expect(page.locator(rows("wang.wu", "DeliveryFailed"))).to_contain_text(
        "errcode 81013", timeout=WAIT_MS
    )
    expect(page.locator('.thread[data-user="wang.wu"] .notice.bad').last).to_contain_text(
        "WeCom refused the reply"
    )
    expect(bot).to_have_count(2)


def test_a_retried_callback_is_stored_once(page: Page) -> None:
    from playwright.sync_api import expect

    chat_as(page, "retry@example")
    page.check("#retry")
    say(page, "WeCom will post this twice")
    mine = page.locator('.thread[data-user="retry@example"] .msg.mine')
    expect(mine.last.locator(".status")).to_contain_text(
        "WeCom retry after 5 s → 200", timeout=WAIT_MS
    )
    page.uncheck("#retry")
    # Events arrive in stream order: once this marker's event is shown, a duplicate of
    # the retried message would have been shown before it.
    say(page, "marker")
    received = page.locator(rows("retry@example", "MessageReceived"))
    expect(received.last).to_contain_text("marker", timeout=WAIT_MS)
    expect(received).to_have_count(2)
    expect(mine.first.locator(".status")).to_contain_text("JetStream kept one")
    expect(page.locator('.thread[data-user="retry@example"] .msg.bot .bubble')).to_have_count(
        2, timeout=WAIT_MS
    )


@contextlib.contextmanager
def runs_of_dev(
    browser: BrowserContext, tmp_path: Path
) -> Iterator[Callable[[], contextlib.AbstractContextManager[Page]]]:
    """``make run`` started again and again on one data dir, as a developer does: each
    ``with run() as page`` is one run, its console open in a page (no JavaScript error
    on it, and dev stopped cleanly after)."""
    env = {
        "GATEWAY_PORT": str(free_port()),
        "WECOMBOT_CONSOLE_PORT": str(free_port()),
        "WECOMBOT_HEALTH_PORT": "0",
    }

    @contextlib.contextmanager
    def run() -> Iterator[Page]:
        from playwright.sync_api import expect

        process = DevProcess(tmp_path, **env)
        page = None
        try:
            url = process.out.wait_for(r"console: (http://127\.0\.0\.1:\d+/)").group(1)
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(url)
            expect(page.locator("#gateway")).to_have_attribute(
                "data-state", "ready", timeout=WAIT_MS
            )
            yield page
            assert errors == [], f"JavaScript errors on the page: {errors}"
        finally:
            if page is not None:
                page.close()
            code = process.stop(timeout=10)
        assert code == 0, process.out.tail()

    yield run


def test_a_restarted_sandbox_shows_the_conversation_in_its_log(
    browser: BrowserContext, tmp_path: Path
) -> None:
    """The data dir outlives ``make run``: after a restart the page started empty, the
    conversation still in the log. It shows again, the reply as the log records it (the
    simulated WeCom that took it is gone), no "…" waiting for it, then what comes."""
    from playwright.sync_api import expect

    thread = '.thread[data-user="restart.user"]'
    with runs_of_dev(browser, tmp_path) as run:
        with run() as page:
            chat_as(page, "restart.user")
            say(page, "记得我吗？remember me")
            expect(page.locator(f"{thread} .msg.bot .bubble")).to_contain_text(
                "you said: 记得我吗？remember me", timeout=WAIT_MS
            )
        with run() as page:
            chat_as(page, "restart.user")
            bot = page.locator(f"{thread} .msg.bot")
            expect(page.locator(f"{thread} .msg.mine .bubble")).to_have_text(
                "记得我吗？remember me", timeout=WAIT_MS
            )
            expect(bot.locator(".bubble")).to_contain_text("you said: 记得我吗？remember me")
            expect(bot.locator(".sender")).to_contain_text("delivered before this console started")
            expect(page.locator(f"{thread} .typing-row")).to_have_count(0)
            expect(page.locator("#event-list li.divider").first).to_contain_text(
                "appended before this console started"
            )
            say(page, "still here")
            expect(bot.last.locator(".bubble")).to_contain_text("still here", timeout=WAIT_MS)
            expect(page.locator("#event-list li.divider").last).to_have_text("Live from here.")
            expect(page.locator(rows("restart.user", "MessageReceived"))).to_have_count(2)


def test_a_reply_after_a_restart_is_not_labelled_as_a_part_from_before(
    browser: BrowserContext, tmp_path: Path
) -> None:
    """The simulated WeCom numbered its msgids from 1 again in each run: after a restart
    the page took the first new reply for the part of the same msgid in the log, and
    labelled that one-part reply "part 1/2"."""
    from playwright.sync_api import expect

    bubbles_of = '.thread[data-user="parts.user"] .msg.bot .bubble'
    sentence = "长回复要按段落和句子拆分，每段不超过两千零四十八字节。"
    with runs_of_dev(browser, tmp_path) as run:
        with run() as page:
            chat_as(page, "parts.user")
            say(page, "请把这段话原样复述。" + sentence * 40)
            expect(page.locator(rows("parts.user", "ReplyDelivered"))).to_contain_text(
                "2 parts delivered", timeout=WAIT_MS
            )
        with run() as page:
            chat_as(page, "parts.user")
            bubbles = page.locator(bubbles_of)
            expect(bubbles).to_have_count(2, timeout=WAIT_MS)  # the two from the log
            say(page, "short")
            expect(bubbles).to_have_count(3, timeout=WAIT_MS)
            expect(bubbles.nth(2)).to_contain_text("you said: short")
            expect(page.locator(rows("parts.user", "ReplyDelivered"))).to_have_count(2)
            expect(bubbles.nth(2).locator(".part")).to_have_count(0)
            expect(bubbles.nth(0).locator(".part")).to_have_text("part 1/2")


def test_screenshot(page: Page, tmp_path: Path) -> None:
    """A conversation worth showing: the README's docs/console.png."""
    from playwright.sync_api import expect

    chat_as(page, "zhang.san")
    page.click("#enter-agent")
    say(page, "/help")
    bot = page.locator('.thread[data-user="zhang.san"] .msg.bot .bubble')
    expect(bot.last).to_contain_text("/reset", timeout=WAIT_MS)
    page.select_option("#fail-code", "45009")
    page.click("#inject")  # WeCom limits the next send once: the sender retries
    say(page, "帮我总结一下今天的会议要点。Summarise today's meeting, please.")
    expect(bot.last).to_contain_text("Summarise today's meeting", timeout=WAIT_MS)
    expect(page.locator('#event-list li[data-kind="api"]').filter(has_text="45009")).to_be_visible()
    expect(page.locator('.thread[data-user="zhang.san"] .typing-row')).to_have_count(0)
    page.locator("#text").blur()
    target = Path(os.environ.get("WECOMBOT_CONSOLE_SCREENSHOT") or tmp_path / "console.png")
    page.screenshot(path=str(target), animations="disabled")
    assert target.stat().st_size > 10_000
