"""Chat messages for one verdict event: Slack Block Kit and a Discord embed (pure).

Every user-controlled string (client_ref, task type, issues, prompts, codes) is escaped, so a
payload can never ping a channel, mention a user or smuggle a link; and every text is cut to
the platform's limit, because one over-long field makes the whole post fail.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

ELLIPSIS = "…"
ZWJ = "\u200d"
MAX_ISSUES = 5
# Slack: header 150, section text 3000, section field 2000, 50 blocks, button text 75.
SLACK_HEADER = 150
SLACK_TEXT = 3000
SLACK_FIELD = 2000
SLACK_BLOCKS = 50
# Discord: title 256, description 4096, field value 1024, 25 fields, 6000 in all.
DISCORD_TITLE = 256
DISCORD_DESCRIPTION = 4096
DISCORD_FIELD = 1024
DISCORD_FIELDS = 25
DISCORD_TOTAL = 6000
MAX_URL = 2048

_SLACK_ENTITIES = {"&": "&amp;", "<": "&lt;", ">": "&gt;"}
# Backslash-escaped, Discord shows these literally: no markdown, mention, link or emoji.
_DISCORD_SPECIAL = frozenset("\\*_~`|<>[]#@")


@dataclass(frozen=True)
class Verdict:
    emoji: str
    label: str
    colour: int


PASSED = Verdict("✅", "Passed", 0x2EB67D)
NOT_PASSED = Verdict("❌", "Not passed", 0xE01E5A)
FAILED = Verdict("⚠️", "Evaluation failed", 0xF2994A)
NO_VERDICT = Verdict("❔", "No verdict", 0x95A5A6)


def verdict(data: dict[str, Any]) -> Verdict:
    """A failed evaluation never judged the image, so `failed` wins over `passed`."""
    if data.get("status") == "failed":
        return FAILED
    if data.get("passed") is True:
        return PASSED
    if data.get("passed") is False:
        return NOT_PASSED
    return NO_VERDICT


def slack_escape(char: str) -> str:
    return _SLACK_ENTITIES.get(char, char)


def discord_escape(char: str) -> str:
    return "\\" + char if char in _DISCORD_SPECIAL else char


def _regional(char: str) -> bool:
    return "\U0001f1e6" <= char <= "\U0001f1ff"


def _extends(char: str) -> bool:
    """A code point that belongs to the character before it: a combining mark (an accent,
    a variation selector), a skin tone, a tag (subdivision flags) or a zero-width joiner."""
    return (
        unicodedata.category(char) in ("Mn", "Mc", "Me")
        or char == ZWJ
        or "\U0001f3fb" <= char <= "\U0001f3ff"
        or "\U000e0020" <= char <= "\U000e007f"
    )


def _inside(text: str, index: int) -> bool:
    """Whether a cut before `text[index]` would split one user-perceived character."""
    before, after = text[index - 1], text[index]
    if before == ZWJ or _extends(after):
        return True
    if not (_regional(before) and _regional(after)):
        return False
    run = 0  # a flag is a pair of regional indicators: an odd run before means mid-flag
    while run < index and _regional(text[index - 1 - run]):
        run += 1
    return run % 2 == 1


def clip(text: str, limit: int, escape: Callable[[str], str] | None = None) -> str:
    """`text` escaped character by character and cut to `limit` with an ellipsis, never through
    the middle of an escape (half an `&amp;` or a lone backslash would show as garbage) nor of
    a character made of several code points (é as e, half a flag, a broken emoji)."""
    pieces = [escape(char) for char in text] if escape else list(text)
    if sum(map(len, pieces)) <= limit:
        return "".join(pieces)
    kept = 0
    used = len(ELLIPSIS)
    for piece in pieces:
        if used + len(piece) > limit:
            break
        kept += 1
        used += len(piece)
    while kept and _inside(text, kept):
        kept -= 1
    return "".join(pieces[:kept]) + ELLIPSIS


def web_url(value: Any, limit: int = MAX_URL) -> str | None:
    """An http(s) URL chat platforms will accept, or None (a bad one fails the whole post)."""
    if not isinstance(value, str) or len(value) > limit or not value.isprintable():
        return None
    if " " in value or not value.lower().startswith(("http://", "https://")):
        return None
    return value if value.split("://", 1)[1].split("/", 1)[0] else None


def _data(event: dict[str, Any]) -> dict[str, Any]:
    data = event.get("data")
    return data if isinstance(data, dict) else {}


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value.strip() else None


def _score(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return f"{value:.0%}" if 0 <= value <= 1 else f"{value:g}"


def _action(data: dict[str, Any]) -> dict[str, Any]:
    action = data.get("action")
    return action if isinstance(action, dict) else {}


def _issues(data: dict[str, Any]) -> list[tuple[str | None, str]]:
    """(where, detail): judge issues when the event has them, else Runflow's top_issues."""
    found: list[tuple[str | None, str]] = []
    issues = data.get("issues")
    for issue in issues if isinstance(issues, list) else []:
        if isinstance(issue, dict) and _text(issue.get("detail")):
            parts = [_text(issue.get(k)) for k in ("category", "subcategory")]
            where = " / ".join(p for p in parts if p)
            judge = _text(issue.get("judge"))
            label = f"{judge} ({where})" if judge and where else judge or where or None
            found.append((label, issue["detail"]))
    if found:
        return found
    top = data.get("top_issues")
    return [(None, item) for item in top if _text(item)] if isinstance(top, list) else []


def _long(value: Any, limit: int, escape: Callable[[str], str]) -> str | None:
    text = _text(value)
    return clip(text, limit, escape) if text else None


def _mrkdwn(text: str) -> dict[str, Any]:
    """`verbatim`: Slack must not turn bare channel names or URLs in user text into links."""
    return {"type": "mrkdwn", "text": text, "verbatim": True}


def _facts(data: dict[str, Any]) -> list[tuple[str, str]]:
    """(name, user-controlled value) pairs shown as short fields on both platforms."""
    facts = [
        ("Score", _score(data.get("score"))),
        ("Client ref", _text(data.get("client_ref"))),
        ("Task type", _text(data.get("task_type"))),
        ("Failure code", _text(data.get("failure_code"))),
        ("Action", _text(_action(data).get("primary_action"))),
    ]
    return [(name, value) for name, value in facts if value is not None]


def _issue_lines(
    data: dict[str, Any], escape: Callable[[str], str], bold: str, label: int, detail: int
) -> str | None:
    """At most MAX_ISSUES bullets; the limits keep the whole list inside one field."""
    issues = _issues(data)
    if not issues:
        return None
    lines = []
    for where, text in issues[:MAX_ISSUES]:
        head = f"{bold}{clip(where, label, escape)}{bold}: " if where else ""
        lines.append(f"• {head}{clip(text, detail, escape)}")
    if len(issues) > MAX_ISSUES:
        lines.append(f"…and {len(issues) - MAX_ISSUES} more")
    return "\n".join(lines)


def slack_message(event: dict[str, Any], *, image: bool = True) -> dict[str, Any]:
    """An incoming-webhook payload; `image=False` leaves the image out, for a retry after
    Slack could not fetch it (`invalid_blocks`)."""
    data = _data(event)
    found = verdict(data)
    score = _score(data.get("score"))
    headline = f"{found.emoji} {found.label}" + (f" · score {score}" if score else "")
    blocks: list[dict[str, Any]] = [
        {"type": "header", "text": {"type": "plain_text", "text": clip(headline, SLACK_HEADER)}}
    ]
    facts = [_mrkdwn(f"*{name}*\n{clip(value, 500, slack_escape)}") for name, value in _facts(data)]
    if facts:
        blocks.append({"type": "section", "fields": facts[:10]})
    action = _action(data)
    sections = [
        ("Summary", _long(action.get("failure_summary"), SLACK_TEXT - 20, slack_escape)),
        ("Issues", _issue_lines(data, slack_escape, "*", 120, 400)),
        ("Improved prompt", _long(action.get("improved_prompt"), SLACK_TEXT - 20, slack_escape)),
    ]
    blocks.extend(
        {"type": "section", "text": _mrkdwn(f"*{title}*\n{body}")}
        for title, body in sections
        if body
    )
    dashboard = web_url(data.get("dashboard_url"), SLACK_TEXT)
    if dashboard:
        button = {"type": "plain_text", "text": "Open in dashboard"}
        blocks.append(
            {"type": "actions", "elements": [{"type": "button", "text": button, "url": dashboard}]}
        )
    picture = web_url(data.get("image_url"), SLACK_TEXT)
    if image and picture:
        blocks.append({"type": "image", "image_url": picture, "alt_text": "generated image"})
    evaluation = _text(data.get("evaluation_id"))
    if evaluation:
        note = f"Evaluation {clip(evaluation, 300, slack_escape)}"
        blocks.append({"type": "context", "elements": [_mrkdwn(note)]})
    ref = _text(data.get("client_ref")) or evaluation or "evaluation"
    task = _text(data.get("task_type"))
    fallback = f"{found.emoji} {found.label}: {ref}" + (f" ({task})" if task else "")
    return {"text": clip(fallback, SLACK_TEXT, slack_escape), "blocks": blocks[:SLACK_BLOCKS]}


def _timestamp(value: Any) -> str | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value).isoformat()
    except ValueError:
        return None


def discord_message(event: dict[str, Any]) -> dict[str, Any]:
    """An execute-webhook payload with one embed; `allowed_mentions` off, so nothing pings."""
    data = _data(event)
    found = verdict(data)
    score = _score(data.get("score"))
    title = f"{found.emoji} {found.label}" + (f" · score {score}" if score else "")
    embed: dict[str, Any] = {"title": clip(title, DISCORD_TITLE), "color": found.colour}
    summary = _long(_action(data).get("failure_summary"), 1500, discord_escape)
    if summary:
        embed["description"] = summary
    fields = [
        {"name": name, "value": clip(value, 200, discord_escape), "inline": True}
        for name, value in _facts(data)
    ]
    issues = _issue_lines(data, discord_escape, "**", 60, 120)
    if issues:
        fields.append({"name": "Issues", "value": clip(issues, DISCORD_FIELD), "inline": False})
    prompt = _long(_action(data).get("improved_prompt"), DISCORD_FIELD, discord_escape)
    if prompt:
        fields.append({"name": "Improved prompt", "value": prompt, "inline": False})
    embed["fields"] = fields[:DISCORD_FIELDS]
    dashboard = web_url(data.get("dashboard_url"))
    if dashboard:
        embed["url"] = dashboard
    picture = web_url(data.get("image_url"))
    if picture:
        embed["image"] = {"url": picture}
    evaluation = _text(data.get("evaluation_id"))
    if evaluation:
        embed["footer"] = {"text": clip(f"Evaluation {evaluation}", 300)}
    stamp = _timestamp(event.get("time"))
    if stamp:
        embed["timestamp"] = stamp
    return {"embeds": [embed], "allowed_mentions": {"parse": []}}


def embed_size(embed: dict[str, Any]) -> int:
    """Characters Discord counts against its 6000 total for one embed."""
    size = len(embed.get("title", "")) + len(embed.get("description", ""))
    size += len(embed.get("footer", {}).get("text", ""))
    return size + sum(len(f["name"]) + len(f["value"]) for f in embed.get("fields", []))
