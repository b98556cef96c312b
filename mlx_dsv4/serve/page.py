"""The chat page at `/`: `static/chat.html` and the headers it is sent with.

The page is one file shipped in the package. Its Content-Security-Policy allows exactly its own
inline script and style (by hash), requests to this origin, and nothing else: even if model text
ever reached the DOM as HTML, no script in it could run or load anything.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import re
from importlib import resources


@functools.cache
def chat_page() -> tuple[bytes, dict[str, str]]:
    """The page's bytes and its response headers."""
    html = resources.files(__package__).joinpath("static/chat.html").read_text(encoding="utf-8")
    script = " ".join(_hashes(html, "script"))
    style = " ".join(_hashes(html, "style"))
    policy = (f"default-src 'none'; script-src {script}; style-src {style}; connect-src 'self'; "
              "img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    return html.encode("utf-8"), {"Content-Security-Policy": policy, "X-Content-Type-Options": "nosniff",
                                  "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}


def _hashes(html: str, tag: str) -> list[str]:
    """CSP source expressions for the inline `<tag>` elements' contents."""
    blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", html, flags=re.S)
    return [f"'sha256-{base64.b64encode(hashlib.sha256(b.encode()).digest()).decode()}'" for b in blocks]
