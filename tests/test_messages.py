from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from receiver.fakes.chat import embed_problem, slack_block_problem
from receiver.messages import (
    DISCORD_TOTAL,
    MAX_ISSUES,
    clip,
    discord_escape,
    discord_message,
    embed_size,
    slack_escape,
    slack_message,
)

from .sinkhelpers import make_event  # the fixture whose issue says <@U123> & <!channel>

DASHBOARD = "https://receiver.example.com"
EVALUATION_ID = "0193a7c2-5b1e-7c3d-9f10-2a4b6c8d0e11"


def texts(value: Any, keys: frozenset[str]) -> Iterator[str]:
    """Every string under one of `keys`, anywhere in a message (URLs are not under them)."""
    if isinstance(value, dict):
        for key, item in value.items():
            if key in keys and isinstance(item, str):
                yield item
            else:
                yield from texts(item, keys)
    elif isinstance(value, list):
        for item in value:
            yield from texts(item, keys)


SLACK_TEXT_KEYS = frozenset({"text"})
DISCORD_TEXT_KEYS = frozenset({"title", "description", "name", "value"})


def escaped(text: str, escape: Callable[[str], str]) -> str:
    return "".join(map(escape, text))


def test_the_fixture_becomes_a_slack_message_with_the_mentions_defused() -> None:
    message = slack_message(make_event())
    blocks = message["blocks"]
    assert message["text"] == "❌ Not passed: customer-job-123 (headshot)"
    assert blocks[0]["text"]["text"] == "❌ Not passed · score 62%"
    facts = [field["text"] for field in blocks[1]["fields"]]
    assert facts == [
        "*Score*\n62%",
        "*Client ref*\ncustomer-job-123",
        "*Task type*\nheadshot",
        "*Action*\nregenerate",
    ]
    everything = "\n".join(texts(message, SLACK_TEXT_KEYS))
    assert "Collar asymmetry &lt;@U123&gt; &amp; &lt;!channel&gt;" in everything
    assert "hands out of frame" in everything
    assert "<" not in everything
    button = next(b for b in blocks if b["type"] == "actions")["elements"][0]
    assert button["url"] == f"{DASHBOARD}/evaluations/{EVALUATION_ID}"
    image = next(b for b in blocks if b["type"] == "image")
    assert image["image_url"] == "https://cdn.example.com/renders/job-123.png"
    assert [slack_block_problem(block) for block in blocks] == [None] * len(blocks)


def test_the_fixture_becomes_a_discord_embed_that_pings_nobody() -> None:
    message = discord_message(make_event())
    assert message["allowed_mentions"] == {"parse": []}
    (embed,) = message["embeds"]
    assert embed["title"] == "❌ Not passed · score 62%"
    assert embed["color"] == 0xE01E5A
    assert embed["url"] == f"{DASHBOARD}/evaluations/{EVALUATION_ID}"
    assert embed["image"] == {"url": "https://cdn.example.com/renders/job-123.png"}
    assert embed["timestamp"] == "2026-11-20T09:14:43.352000+00:00"
    issues = next(f["value"] for f in embed["fields"] if f["name"] == "Issues")
    assert "Collar asymmetry \\<\\@U123\\> & \\<!channel\\>" in issues
    assert embed_problem(embed) is None


def put(event: dict[str, Any], where: str, value: Any) -> dict[str, Any]:
    """`event` with one user-controlled field set to `value`."""
    data = event["data"]
    if where == "top_issues":
        data["issues"] = []
        data["top_issues"] = [value]
    elif where in ("detail", "judge", "category"):
        issue = {"judge": "anatomy", "category": "anatomy", "subcategory": "hands", "detail": "x"}
        data["issues"] = [{**issue, where: value}]
    elif where in ("failure_summary", "improved_prompt", "primary_action"):
        data["action"][where] = value
    elif where == "failure_code":
        data.update(status="failed", passed=None, failure_code=value)
    else:
        data[where] = value
    return event


PLACES = [
    "client_ref",
    "task_type",
    "failure_code",
    "top_issues",
    "detail",
    "judge",
    "category",
    "failure_summary",
    "improved_prompt",
    "primary_action",
]
HOSTILE = [
    "<script>alert(1)</script>",
    "<@U123>",
    "<!channel>",
    "<!here|here>",
    "<#C024BE7LR>",
    "<http://x|y>",
    "fish & chips",
    "a > b",
    "&lt;already escaped&gt;",
]


@pytest.mark.parametrize("value", HOSTILE)
@pytest.mark.parametrize("where", [*PLACES, "evaluation_id"])
def test_slack_escapes_every_user_controlled_string(where: str, value: str) -> None:
    message = slack_message(put(make_event(), where, value))
    everything = "\n".join(texts(message, SLACK_TEXT_KEYS))
    assert escaped(value, slack_escape) in everything
    assert "<" not in everything
    assert ">" not in everything
    assert not re.search(r"&(?!amp;|lt;|gt;)", everything)


@pytest.mark.parametrize(
    "value", [*HOSTILE, "@everyone", "@here", "[x](https://evil.example)", "||hidden||"]
)
@pytest.mark.parametrize("where", PLACES)
def test_discord_escapes_markdown_and_mentions(where: str, value: str) -> None:
    message = discord_message(put(make_event(), where, value))
    assert message["allowed_mentions"] == {"parse": []}
    everything = "\n".join(texts(message, DISCORD_TEXT_KEYS))
    assert escaped(value, discord_escape) in everything
    for raw in ("<", "@", "[", "]", "|"):
        assert not re.search(rf"(?<!\\){re.escape(raw)}", everything), raw


@pytest.mark.parametrize(
    ("text", "limit", "escape", "expected"),
    [
        ("abc", 3, None, "abc"),
        ("abcd", 3, None, "ab…"),
        ("a&b", 7, slack_escape, "a&amp;b"),
        ("a&b", 6, slack_escape, "a…"),
        ("&&&", 10, slack_escape, "&amp;…"),
        ("<@U1>", 9, slack_escape, "&lt;@U1…"),
        ("@everyone", 20, discord_escape, "\\@everyone"),
        ("**bold**", 5, discord_escape, "\\*\\*…"),
        ("\\\\\\", 4, discord_escape, "\\\\…"),
        ("🙂🙂🙂", 2, None, "🙂…"),
    ],
)
def test_clip_never_cuts_through_an_escape(
    text: str, limit: int, escape: Callable[[str], str] | None, expected: str
) -> None:
    assert clip(text, limit, escape) == expected
    assert len(clip(text, limit, escape)) <= limit


@pytest.mark.parametrize(
    ("text", "limit", "escape", "expected"),
    [
        ("e\u0301" * 3, 4, None, "e\u0301…"),  # é as e + a combining accent
        ("🇫🇷🇩🇪🇮🇹", 4, None, "🇫🇷…"),  # a flag is two regional indicators
        ("👩\u200d👩\u200d👧 family", 5, None, "…"),  # one emoji joined by ZWJs
        ("👍🏽" * 3, 4, None, "👍🏽…"),  # a skin tone modifies the emoji before it
        ("⚠\ufe0f" * 3, 4, None, "⚠\ufe0f…"),  # a variation selector
        ("*\u0301" * 3, 6, discord_escape, "\\*\u0301…"),
        ("&\u0301" * 3, 12, slack_escape, "&amp;\u0301…"),
    ],
)
def test_clip_never_cuts_a_character_made_of_several_code_points(
    text: str, limit: int, escape: Callable[[str], str] | None, expected: str
) -> None:
    """Half a character shows as another one (é as e), a stray letter or a broken emoji."""
    assert clip(text, limit, escape) == expected


def check_slack_limits(message: dict[str, Any]) -> None:
    blocks = message["blocks"]
    assert len(blocks) <= 50
    assert [slack_block_problem(block) for block in blocks] == [None] * len(blocks)
    for text in texts(message, SLACK_TEXT_KEYS):
        assert len(text) <= 3000
        assert not re.search(r"&(?!amp;|lt;|gt;)", text), "an escape was cut"


def check_discord_limits(message: dict[str, Any]) -> None:
    (embed,) = message["embeds"]
    assert embed_problem(embed) is None
    assert embed_size(embed) <= DISCORD_TOTAL
    for text in texts(message, DISCORD_TEXT_KEYS):
        trailing = len(text.removesuffix("…")) - len(text.removesuffix("…").rstrip("\\"))
        assert trailing % 2 == 0, "a backslash escape was cut"


HUGE = ["x" * 10_000, "&" * 10_000, "<" * 10_000, "\\" * 10_000, "🙂" * 10_000]


@pytest.mark.parametrize("value", HUGE, ids=["plain", "amp", "lt", "backslash", "emoji"])
@pytest.mark.parametrize("where", [*PLACES, "evaluation_id"])
def test_every_text_is_cut_to_the_platform_limits(where: str, value: str) -> None:
    check_slack_limits(slack_message(put(make_event(), where, value)))
    check_discord_limits(discord_message(put(make_event(), where, value)))


def test_at_most_five_issues_are_listed_with_a_count_of_the_rest() -> None:
    event = make_event()
    event["data"]["issues"] = [
        {"judge": f"judge{i}", "category": "c" * 500, "subcategory": None, "detail": "d" * 5000}
        for i in range(100)
    ]
    slack = slack_message(event)
    check_slack_limits(slack)
    issues = next(t for t in texts(slack, SLACK_TEXT_KEYS) if t.startswith("*Issues*"))
    assert issues.count("\n• ") == MAX_ISSUES
    assert issues.endswith(f"…and {100 - MAX_ISSUES} more")
    discord = discord_message(event)
    check_discord_limits(discord)
    value = next(f["value"] for f in discord["embeds"][0]["fields"] if f["name"] == "Issues")
    assert value.endswith(f"…and {100 - MAX_ISSUES} more")


@pytest.mark.parametrize(
    ("count", "rest"), [(MAX_ISSUES - 1, None), (MAX_ISSUES, None), (MAX_ISSUES + 1, 1)]
)
def test_the_count_of_the_rest_appears_only_past_the_limit(count: int, rest: int | None) -> None:
    event = make_event()
    event["data"]["issues"] = [
        {"judge": f"judge{i}", "category": "hands", "subcategory": None, "detail": "six fingers"}
        for i in range(count)
    ]
    slack = slack_message(event)
    issues = next(t for t in texts(slack, SLACK_TEXT_KEYS) if t.startswith("*Issues*"))
    discord = discord_message(event)
    value = next(f["value"] for f in discord["embeds"][0]["fields"] if f["name"] == "Issues")
    for text in (issues, value):
        assert text.count("• ") == min(count, MAX_ISSUES)
        assert ("more" in text) is (rest is not None)
        if rest is not None:
            assert text.endswith(f"…and {rest} more")


@pytest.mark.parametrize(
    ("status", "passed", "failure_code", "headline", "colour"),
    [
        ("completed", True, None, "✅ Passed", 0x2EB67D),
        ("completed", False, None, "❌ Not passed", 0xE01E5A),
        ("failed", None, "image_fetch_failed", "⚠️ Evaluation failed", 0xF2994A),
        ("failed", False, "timeout", "⚠️ Evaluation failed", 0xF2994A),
        ("failed", True, "timeout", "⚠️ Evaluation failed", 0xF2994A),  # failed wins over passed
        ("completed", None, None, "❔ No verdict", 0x95A5A6),
    ],
)
def test_the_verdict_sets_headline_and_colour(
    status: str, passed: bool | None, failure_code: str | None, headline: str, colour: int
) -> None:
    event = make_event()
    event["data"].update(status=status, passed=passed, failure_code=failure_code)
    slack = slack_message(event)
    discord = discord_message(event)
    assert slack["blocks"][0]["text"]["text"].startswith(headline)
    assert slack["text"].startswith(headline)
    assert discord["embeds"][0]["title"].startswith(headline)
    assert discord["embeds"][0]["color"] == colour
    facts = {f["name"]: f["value"] for f in discord["embeds"][0]["fields"]}
    slack_facts = [f["text"] for f in slack["blocks"][1]["fields"]]
    if failure_code:
        assert facts["Failure code"] == escaped(failure_code, discord_escape)
        assert f"*Failure code*\n{failure_code}" in slack_facts
    else:
        assert "Failure code" not in facts


def test_a_bare_event_still_makes_valid_messages() -> None:
    event = {"id": "e", "type": "io.runflow.evaluation.completed", "data": {"status": "failed"}}
    slack = slack_message(event)
    assert slack["blocks"] == [
        {"type": "header", "text": {"type": "plain_text", "text": "⚠️ Evaluation failed"}}
    ]
    assert slack["text"] == "⚠️ Evaluation failed: evaluation"
    embed = discord_message(event)["embeds"][0]
    assert embed == {"title": "⚠️ Evaluation failed", "color": 0xF2994A, "fields": []}


URLS = [
    ("https://cdn.example.com/a.png", True, True),
    ("http://cdn.example.com/a.png", True, True),
    ("HTTPS://cdn.example.com/a.png", True, True),
    ("https://cdn.example.com/" + "a" * 2100, True, False),
    ("https://cdn.example.com/" + "a" * 3000, False, False),
    ("javascript:alert(1)", False, False),
    ("ftp://cdn.example.com/a.png", False, False),
    ("data:image/png;base64,AAAA", False, False),
    ("https://", False, False),
    ("https://cdn.example.com/a b.png", False, False),
    ("https://cdn.example.com/a\n.png", False, False),
    (None, False, False),
    (42, False, False),
]


@pytest.mark.parametrize(("url", "in_slack", "in_discord"), URLS)
def test_only_http_urls_become_images_and_links(url: Any, in_slack: bool, in_discord: bool) -> None:
    event = make_event()
    event["data"].update(image_url=url, dashboard_url=url)
    blocks, embed = slack_message(event)["blocks"], discord_message(event)["embeds"][0]
    assert [b["image_url"] for b in blocks if b["type"] == "image"] == [url] * in_slack
    links = [b["elements"][0]["url"] for b in blocks if b["type"] == "actions"]
    assert links == [url] * in_slack
    assert (embed.get("image"), embed.get("url")) == (
        ({"url": url}, url) if in_discord else (None, None)
    )
    assert [b for b in slack_message(event, image=False)["blocks"] if b["type"] == "image"] == []


@pytest.mark.parametrize(
    ("score", "shown"),
    [(0.62, "62%"), (1, "100%"), (0, "0%"), (87.5, "87.5"), (None, None), (True, None)],
)
def test_scores_are_shown_as_percentages(score: Any, shown: str | None) -> None:
    event = make_event()
    event["data"]["score"] = score
    facts = {f["name"]: f["value"] for f in discord_message(event)["embeds"][0]["fields"]}
    assert facts.get("Score") == shown


def test_slack_shows_user_text_verbatim() -> None:
    """Without `verbatim`, Slack turns a bare #channel or URL in a judge's text into a link."""
    message = slack_message(make_event())
    mrkdwn = [
        block
        for block in walk(message)
        if isinstance(block, dict) and block.get("type") == "mrkdwn"
    ]
    assert mrkdwn
    assert all(block.get("verbatim") is True for block in mrkdwn)


def walk(value: Any) -> Iterator[Any]:
    yield value
    children = (
        value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    )
    for child in children:
        yield from walk(child)
