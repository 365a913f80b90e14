"""robots.txt, as RFC 9309 reads it: which paths of a host we may request.

Parsed here rather than with ``urllib.robotparser`` because that one decides by the
first matching line and knows neither ``*`` nor ``$``; the RFC (and every large
crawler) takes the *longest* matching pattern, ``Allow`` winning a tie, with both
wildcards. Our group is the one naming our product token (``webclip``), all such
groups merged, else the ``*`` group(s), else none: everything allowed.

What a failed fetch means is the RFC's too, and ``policy_for_status`` applies it:
4xx (robots.txt "unavailable") allows everything; 5xx, 429 and network failures
("unreachable") disallow everything, since we cannot know what the site wants.
``Crawl-delay`` is not in the RFC but widely used; we honour it (see config).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from core.reasons import Reason

PRODUCT_TOKEN = "webclip"
MAX_RULES = 10_000  # a robots.txt of millions of lines must not cost minutes per URL


@dataclass(frozen=True)
class RobotsPolicy:
    """What one origin allows us; ``blocked`` set means: request nothing there, for that reason."""

    rules: tuple[tuple[int, bool, re.Pattern], ...] = ()  # (pattern length, allow, compiled pattern)
    crawl_delay: float | None = None
    blocked: Reason | None = None
    blocked_detail: str = ""

    def allows(self, url: str) -> bool:
        if self.blocked is not None:
            return False
        parts = urlsplit(url)
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        if path == "/robots.txt":
            return True
        best_length, allowed = -1, True
        for length, allow, pattern in self.rules:  # the longest match wins; on a tie, Allow
            if (length > best_length or (length == best_length and allow)) and pattern.match(path):
                best_length, allowed = length, allow
        return allowed


ALLOW_ALL = RobotsPolicy()


def _compile(pattern: str) -> re.Pattern:
    anchored = pattern.endswith("$")
    body = pattern[:-1] if anchored else pattern
    regex = ".*".join(re.escape(piece) for piece in body.split("*"))
    return re.compile(regex + (r"\Z" if anchored else ""), re.DOTALL)


def parse_robots(text: str, token: str = PRODUCT_TOKEN) -> RobotsPolicy:
    """The policy for ``token`` in a robots.txt body (lenient: unknown lines are ignored)."""
    token = token.lower()
    groups: list[tuple[set[str], list[tuple[str, str]]]] = []
    agents: set[str] = set()
    lines: list[tuple[str, str]] = []
    in_rules = False
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key, value = key.strip().lower(), value.strip()
        if key in ("user-agent", "useragent"):
            if in_rules:  # a user-agent line after rules starts the next group
                groups.append((agents, lines))
                agents, lines, in_rules = set(), [], False
            agents.add(value.lower())
        elif key in ("allow", "disallow", "crawl-delay") and agents:
            in_rules = True
            lines.append((key, value))
    if agents:
        groups.append((agents, lines))

    ours = [g for g in groups if any(a == token or a.split("/")[0] == token for a in g[0])]
    chosen = ours or [g for g in groups if "*" in g[0]]
    rules: list[tuple[int, bool, re.Pattern]] = []
    delay = None
    for _, group_lines in chosen:
        for key, value in group_lines:
            if key == "crawl-delay":
                try:
                    delay = max(delay or 0.0, float(value))
                except ValueError:
                    pass
            elif value and len(rules) < MAX_RULES:  # an empty Disallow allows everything: no rule
                pattern = value if value.startswith(("/", "*")) else "/" + value
                rules.append((len(pattern), key == "allow", _compile(pattern)))
    return RobotsPolicy(rules=tuple(rules), crawl_delay=delay)


def policy_for_status(status: int) -> RobotsPolicy | None:
    """The policy a non-2xx robots.txt answer implies; None for 2xx (parse the body)."""
    if 200 <= status < 300:
        return None
    if 400 <= status < 500 and status != 429:
        return ALLOW_ALL
    return RobotsPolicy(blocked=Reason.ROBOTS_UNREACHABLE, blocked_detail=f"robots.txt answered HTTP {status}")


def robots_url(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}/robots.txt"
