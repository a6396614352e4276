"""The dashboard page (``GET /dashboard``) and the login link's landing (``/?login=<code>``).

The page is static HTML with its script inline (no build step, no CDN: charts are plain SVG);
it reads ``/v1/admin/dashboard/events`` with the console cookie, like the chat page at ``/``.
Without the cookie it asks for an API key in a form (``POST /v1/auth/login``).

A login link that expired or was used already lands on a page that says what to do
(`tokenbridge login-link` prints a fresh one), not on JSON.
"""

from __future__ import annotations

import html
import importlib.resources

from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route

from tokenbridge.exceptions import AuthError

__all__ = ["PAGE_HEADERS", "login_link", "routes"]

PAGE_HEADERS = {
    "cache-control": "no-cache",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "content-security-policy": "default-src 'self'; style-src 'self' 'unsafe-inline'; "
    "script-src 'self' 'unsafe-inline'; img-src 'self' data:; frame-ancestors 'none'",
}

_LINK_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>tokenbridge: login link</title>
<style>
  :root {{ color-scheme: light dark; }}
  body {{ font: 15px/1.5 system-ui, sans-serif; max-width: 34rem; margin: 12vh auto;
         padding: 0 1rem; }}
  code {{ font-family: ui-monospace, Menlo, Consolas, monospace; padding: 0 .25em;
         border: 1px solid #8884; border-radius: 4px; }}
</style></head>
<body>
<h1>This login link no longer works</h1>
<p>{reason}</p>
<p>Get a fresh one-time link on the machine that runs tokenbridge:</p>
<p><code>tokenbridge login-link</code></p>
<p>or <a href="/">open the page</a> and sign in with an API key.</p>
</body></html>
"""


def _page(name: str) -> str:
    return (importlib.resources.files("tokenbridge.gateway") / "static" / name).read_text()


async def dashboard_page(request: Request) -> Response:
    state = request.app.state
    page = getattr(state, "dashboard_html", None)
    if page is None:
        page = state.dashboard_html = _page("dashboard.html")
    return HTMLResponse(page, headers=PAGE_HEADERS)


async def login_link(request: Request, code: str) -> Response:
    """``/?login=<code>``: set the console cookie, or explain why the link failed."""
    from tokenbridge.gateway import api

    try:
        return await api.login_link(request, code)
    except AuthError as exc:
        reason = html.escape(str(exc).capitalize() + ".")
        return HTMLResponse(
            _LINK_PAGE.format(reason=reason), status_code=exc.status_code, headers=PAGE_HEADERS
        )


routes: list[Route] = [Route("/dashboard", dashboard_page, methods=["GET"])]
