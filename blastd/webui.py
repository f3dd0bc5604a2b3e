"""The operators' read-only web pages as HTML strings: campaigns with their progress, one
campaign's recipients, the dead letters, and the login form.

Rendered on the server with no script at all; every value from the ledger, Redis or the request
goes through html.escape (attributes and URLs too), so a campaign id, a provider's error text or
a producer's raw input can never become markup.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from html import escape
from typing import Any
from urllib.parse import quote, urlencode

from blastd import exports, queues

SESSION_COOKIE = "blastd_admin"
# Sent with every page: no script, no frame, nothing from elsewhere, forms only to us.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
RECIPIENTS_PER_PAGE = 200

_STYLE = """
body { font: 14px system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin-top: 1em; }
th, td { border-bottom: 1px solid #ddd; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
nav a, nav form { margin-right: 1em; display: inline; }
.muted { color: #777; }
.moment { white-space: nowrap; }
.state-failed, .state-video_failed, .state-uncertain { color: #b00020; }
.state-sent, .state-delivered, .state-read, .state-done { color: #0a6b2d; }
"""


def is_session_token(cookie: str | None, expected: bytes) -> bool:
    """Whether the session cookie holds the admin token (compared in constant time)."""
    return cookie is not None and hmac.compare_digest(cookie.encode(), expected)


def page(title: str, body: str, *, nav: bool = True) -> str:
    links = (
        '<nav><a href="/ui">campaigns</a><a href="/ui/dead">dead letters</a>'
        '<form method="post" action="/ui/logout"><button>log out</button></form></nav>'
        if nav
        else ""
    )
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{escape(title)} - blastd</title><style>{_STYLE}</style></head>"
        f"<body>{links}<h1>{escape(title)}</h1>{body}</body></html>"
    )


def _table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A table whose cells are already HTML (each built from escaped values)."""
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _text(value: object) -> str:
    if value is None:
        return '<span class="muted">-</span>'
    if isinstance(value, datetime):
        moment = value.astimezone(UTC).isoformat(timespec="seconds")
        return f'<span class="moment">{escape(moment)}</span>'
    return escape(str(value))


def _state(state: str, reason: str | None = None) -> str:
    why = f' <span class="muted">({escape(reason)})</span>' if reason else ""
    return f'<span class="state-{escape(state)}">{escape(state)}</span>{why}'


def _progress(done: int, total: int) -> str:
    return f'<progress value="{done}" max="{max(total, 1)}"></progress> {done}/{total}'


def campaign_url(campaign_id: str) -> str:
    return "/ui/campaigns/" + quote(campaign_id, safe="")


def _select(name: str, options: Sequence[str], chosen: Sequence[str]) -> str:
    items = ['<option value="">any</option>'] + [
        f"<option{' selected' if option in chosen else ''}>{escape(option)}</option>"
        for option in options
    ]
    return f'<label>{escape(name)} <select name="{escape(name)}">{"".join(items)}</select></label>'


# --- pages -----------------------------------------------------------------------------------


def render_campaigns(lines: Sequence[exports.CampaignLine], states: Sequence[str]) -> str:
    """The campaign list, newest first, with a progress bar each."""
    form = (
        '<form method="get" action="/ui">'
        f"{_select('state', exports.CAMPAIGN_STATES, states)} <button>filter</button></form>"
    )
    rows = (
        [
            f'<a href="{escape(campaign_url(line.id))}">{escape(line.id)}</a>',
            _text(line.type),
            _text(line.account),
            _state(line.state, line.state_reason),
            _progress(line.done, line.total),
            _text(line.created_at),
            _text(line.finished_at),
        ]
        for line in lines
    )
    headers = ("campaign", "type", "account", "state", "progress", "created", "finished")
    table = _table(headers, rows) if lines else "<p>no campaigns</p>"
    return page("campaigns", form + table)


def render_campaign(
    report: Mapping[str, Any],
    which: exports.RecipientFilter,
    recipients: Sequence[exports.RecipientLine],
    next_after: int | None,
) -> str:
    """One campaign: its status and counts, the recipient filters, one page of recipients, the
    link to the next page and the CSV download of every matching recipient."""
    parts = [_summary(report), _filters(which), _csv_link(which), _recipients(recipients)]
    if next_after is not None:
        query = [*_filter_query(which), ("after", str(next_after))]
        url = f"{campaign_url(which.campaign_id)}?{urlencode(query)}"
        parts.append(f'<p><a href="{escape(url)}">next {RECIPIENTS_PER_PAGE}</a></p>')
    return page(f"campaign {report['id']}", "".join(parts))


def _summary(report: Mapping[str, Any]) -> str:
    counts = ", ".join(f"{_state(state)} {n}" for state, n in report["counts"].items())
    return (
        f"<p>{_text(report['account'])}: {_state(report['state'], report['state_reason'])}, "
        f"{_progress(report['done'], report['total'])}</p><p>{counts}</p>"
    )


def _filter_query(which: exports.RecipientFilter) -> list[tuple[str, str]]:
    return [("state", s) for s in which.states] + [("class", c) for c in which.classes]


def _filters(which: exports.RecipientFilter) -> str:
    chosen_class = which.classes[0] if which.classes else ""
    return (
        f'<form method="get" action="{escape(campaign_url(which.campaign_id))}">'
        f"{_select('state', exports.RECIPIENT_STATES, which.states)} "
        f'<label>class <input name="class" value="{escape(chosen_class)}"></label> '
        "<button>filter</button></form>"
    )


def _csv_link(which: exports.RecipientFilter) -> str:
    query = urlencode(_filter_query(which))
    url = f"{campaign_url(which.campaign_id)}/recipients.csv" + (f"?{query}" if query else "")
    return f'<p><a href="{escape(url)}" download>download CSV</a> (numbers masked)</p>'


def _recipients(recipients: Sequence[exports.RecipientLine]) -> str:
    if not recipients:
        return "<p>no recipients match</p>"
    headers = ("id", "number", "state", "class", "code", "text", "skip reason", "attempts")
    rows = (
        [
            _text(line.id),
            _text(line.number),
            _state(line.state),
            _text(line.error_class),
            _text(line.error_code),
            _text(line.error_text),
            _text(line.skip_reason),
            _text(line.attempts),
            _text(line.flags),
            _text(line.updated_at),
        ]
        for line in recipients
    )
    return _table((*headers, "flags", "updated"), rows)


def render_dead(entries: Sequence[queues.DeadEntry]) -> str:
    """The most recent dead letters: index, when, job id, payload size and reason (the payload
    itself stays out of the page: it holds numbers)."""
    rows = []
    for entry in entries:
        fields, payload = entry.fields, entry.payload()
        rows.append(
            [
                _text(entry.index),
                _text(fields.get("dead_at")),
                _text(fields.get("job_id")),
                _text(None if payload is None else f"{len(payload)} B"),
                _text(fields.get("reason")),
            ]
        )
    headers = ("index", "dead at", "job", "payload", "reason")
    table = _table(headers, rows) if rows else "<p>no dead-letter entries</p>"
    hint = '<p class="muted">requeue with <code>blastd dead requeue INDEX</code></p>'
    return page("dead letters", table + hint)


def render_login(*, failed: bool) -> str:
    """The token form; the token goes in a POST body, never in a URL."""
    error = "<p class='state-failed'>wrong token</p>" if failed else ""
    form = (
        '<form method="post" action="/ui/login">'
        '<label>admin token <input type="password" name="token" autocomplete="current-password" '
        "autofocus></label> <button>log in</button></form>"
    )
    return page("log in", error + form, nav=False)
