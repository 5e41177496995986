"""The chat page in headless Chromium (Debian's /usr/bin/chromium driven by Playwright): send
with Enter, see the answer stream, thumb it, regenerate, compare the two answers, switch
between them, stop an answer, see errors, survive a dropped socket - and the rows in PostgreSQL.

Set FLYWHEEL_SCREENSHOT=/tmp/flywheel-chat.png to keep a screenshot of the page.
"""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from collections.abc import AsyncIterator

import pytest
from playwright.async_api import Browser, Page, async_playwright, expect

from server_testkit import make_settings, rows, serve

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]
TIMEOUT_MS = 30_000
expect.set_options(timeout=TIMEOUT_MS)  # assertions wait as long as actions (CPUs may be busy)


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        await browser.close()


@pytest.fixture(scope="module")
async def page_url(db_url, engine, tmp_path_factory) -> AsyncIterator[str]:
    # Long enough answers to press stop in the middle of one; short message limit to show an error.
    settings = make_settings(
        db_url,
        tmp_path_factory.mktemp("page"),
        default_max_new_tokens=48,
        max_message_chars=300,
    )
    async with serve(settings, engine) as url:
        yield url


@pytest.fixture
async def page(browser, page_url) -> AsyncIterator[Page]:
    context = await browser.new_context(viewport={"width": 1280, "height": 860})
    page = await context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    await page.goto(page_url)
    await expect(page.locator("#connection")).to_have_attribute("data-state", "open")
    yield page
    await context.close()


def count_frames(page: Page) -> dict[str, int]:
    """Counts the server's websocket frames by type, to see that answers really stream."""
    seen: dict[str, int] = {}

    def on_socket(socket):
        def on_frame(payload):
            kind = json.loads(payload)["type"]
            seen[kind] = seen.get(kind, 0) + 1

        socket.on("framereceived", on_frame)

    page.on("websocket", on_socket)
    return seen


async def wait_for_answer(page: Page, index: int):
    """The index-th answer shown, once it has finished streaming."""
    answer = page.locator(".msg.assistant").nth(index)
    await expect(answer.locator(".actions")).to_be_visible()
    return answer


async def test_chat_thumb_regenerate_compare(browser, page_url, db):
    context = await browser.new_context(viewport={"width": 1280, "height": 860})
    page = await context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    frames = count_frames(page)
    await page.goto(page_url)
    await expect(page.locator("#connection")).to_have_attribute("data-state", "open")
    token = await page.evaluate("localStorage.getItem('flywheel.token')")
    assert token and len(token) >= 43

    # Shift+Enter is a newline, Enter sends.
    box = page.locator("#input")
    await box.fill("What is the capital of France?")
    await box.press("Shift+Enter")
    await box.type("Answer briefly.")
    assert await box.input_value() == "What is the capital of France?\nAnswer briefly."
    await box.press("Enter")
    await expect(page.locator(".msg.user .content")).to_have_text("What is the capital of France?\nAnswer briefly.")
    first = await wait_for_answer(page, 0)
    assert await box.input_value() == ""
    assert frames.get("token", 0) >= 2, f"the answer did not stream: {frames}"
    first_id = await first.get_attribute("data-id")
    first_text = await first.locator(".content").inner_text()
    assert first_text

    # The conversation is listed, titled by the question.
    await expect(page.locator(".conversation.active")).to_have_text("What is the capital of France? Answer briefly.")
    await expect(page.locator("#chat-title")).to_have_text("What is the capital of France? Answer briefly.")

    # Thumbs up.
    await first.locator(".thumb.up").click()
    await expect(first.locator(".thumb.up")).to_have_class("thumb up on")
    await _eventually(lambda: _rating(db, first_id), 1)

    # Regenerate: a second answer, "2/2", and the better / worse / same question.
    await first.locator(".regenerate").click()
    await expect(page.locator(".msg.assistant .position")).to_have_text("2/2")
    second = await wait_for_answer(page, 0)
    second_id = await second.get_attribute("data-id")
    assert second_id != first_id
    card = second.locator(".compare")
    await expect(card).to_contain_text("Compared with the previous answer (1/2)")
    if os.environ.get("FLYWHEEL_SCREENSHOT"):
        await page.screenshot(path=os.environ["FLYWHEEL_SCREENSHOT"])
    await card.locator(".verdict-better").click()
    await expect(card).to_have_text("Thanks, your comparison was saved.")

    # Back to the first answer with "<".
    await second.locator(".siblings .prev").click()
    shown = page.locator(".msg.assistant").nth(0)
    await expect(shown.locator(".position")).to_have_text("1/2")
    await expect(shown.locator(".content")).to_have_text(first_text)
    await expect(shown.locator(".thumb.up")).to_have_class("thumb up on")

    (comparison,) = await rows(
        db, "SELECT message_id, other_id, verdict FROM comparisons WHERE message_id = %s", uuid.UUID(second_id)
    )
    assert (str(comparison["other_id"]), comparison["verdict"]) == (first_id, "better")
    siblings = await rows(
        db,
        """SELECT m.id FROM messages m JOIN messages o ON o.parent_id = m.parent_id
           WHERE o.id = %s AND m.role = 'assistant' ORDER BY m.created_at""",
        uuid.UUID(first_id),
    )
    assert [str(s["id"]) for s in siblings] == [first_id, second_id]

    # A reload keeps the identity and reopens the conversation with its tree.
    await page.reload()
    await expect(page.locator("#connection")).to_have_attribute("data-state", "open")
    await expect(page.locator(".msg.assistant .position")).to_have_text("2/2")
    assert await page.evaluate("localStorage.getItem('flywheel.token')") == token
    await context.close()


async def test_stop_errors_new_chat_and_reconnect(page, db):
    box = page.locator("#input")
    await box.fill("Tell me a long story")
    await box.press("Enter")
    stop = page.locator("#stop")
    await expect(stop).to_be_visible()
    await expect(page.locator(".msg.assistant.streaming")).to_have_count(1)
    await stop.click()
    answer = await wait_for_answer(page, 0)
    await expect(answer.locator(".note")).to_have_text("Stopped.")
    answer_id = await answer.get_attribute("data-id")
    await _eventually(lambda: _finish_reason(db, answer_id), "cancelled")
    await expect(stop).to_be_hidden()

    # A refused message: the error is shown, and the text goes back into the box.
    long_text = "x" * 400
    await box.fill(long_text)
    await box.press("Enter")
    await expect(page.locator("#error")).to_be_visible()
    await expect(page.locator("#error-text")).to_contain_text("over the limit of 300")
    assert await box.input_value() == long_text
    await expect(page.locator(".msg.user")).to_have_count(1)

    # New chat empties the thread; the old conversation stays in the list.
    await page.locator("#new-chat").click()
    await expect(page.locator("#empty")).to_be_visible()
    await expect(page.locator(".conversation")).to_have_count(1)

    # A dropped socket reconnects by itself and the page works again.
    await page.evaluate("socket.close()")
    await expect(page.locator("#connection")).to_have_attribute("data-state", "closed")
    await expect(page.locator("#connection")).to_have_attribute("data-state", "open")
    await box.fill("Hello again")
    await box.press("Enter")
    await wait_for_answer(page, 0)
    await expect(page.locator(".conversation")).to_have_count(2)


async def _rating(db, message_id: str):
    found = await rows(db, "SELECT rating FROM ratings WHERE message_id = %s", uuid.UUID(message_id))
    return found[0]["rating"] if found else None


async def _finish_reason(db, message_id: str):
    found = await rows(db, "SELECT finish_reason FROM messages WHERE id = %s", uuid.UUID(message_id))
    return found[0]["finish_reason"] if found else None


async def _eventually(read, wanted, attempts: int = 100):
    for _ in range(attempts):
        got = await read()
        if got == wanted:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"expected {wanted!r}, last read {got!r}")
