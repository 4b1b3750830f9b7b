"""The dashboard's pages: server-rendered Jinja2 over :mod:`worker.inspect`, a few lines of plain JavaScript for
live refresh (``static/dashboard.js``), inline SVG charts (:mod:`producer.dashboard.charts`).

Every page needs the admin token (:mod:`producer.dashboard.auth`); without ``Settings.admin_token`` the
dashboard is off (404). Nothing here reads an account's secrets: the read API never does.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import heapq
import json
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from typing import Any, Literal
from urllib.parse import urlencode

from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape
from markupsafe import Markup
from redis.asyncio import Redis
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response

from passbridge.keys import DASHBOARD_LOGIN_FAILURES, account_keys
from passbridge.metrics import BUCKET_S
from producer.context import ProducerContext
from producer.dashboard import auth
from producer.dashboard.charts import Line, line_chart, recent
from worker import dlq, inspect
from worker.dlq import DLQFilter

SECURITY_HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
#: Most DLQ entries a page lists, and most ids a confirmation page previews.
DLQ_PAGE = 200
PREVIEW = 20
#: Most DLQ entries one dead-letters page or bulk selection reads (it runs on the producer's event loop, beside
#: ingest); past it the page says so (README "The dashboard"). A bulk selection by time alone reads none.
DLQ_EXAMINE = 20_000
STATIC = {"dashboard.js": "text/javascript", "dashboard.css": "text/css"}


def url(path: str, **params: Any) -> str:
    """``path`` with the non-empty ``params`` as a query string."""
    query = urlencode({k: v for k, v in params.items() if v not in (None, "")})
    return f"{path}?{query}" if query else path


#: What a redirect may ask the next page to say: ``?notice=<code>``, plus ``done``, ``total`` and ``left`` for the
#: texts with counts. The words are always these: a crafted link cannot show an operator a message of its own.
NoticeCode = Literal["replayed-one", "nothing-matched", "replayed", "replayed-short", "purged"]
NOTICES: dict[str, str] = {
    "replayed-one": "replayed: back in its serial's queue",
    "nothing-matched": "nothing matched",
    "replayed": "replayed {done} of {total} selected",
    "replayed-short": (
        "replayed {done} of {total} selected; {left} of them are still in the DLQ: their account's backlog has "
        "reached its replay limit (PASSBRIDGE_BACKLOG_HIGH_WATER less the PASSBRIDGE_REPLAY_RESERVE kept for live "
        "ingest), and replaying them now would take the room kept for its live ingest. Replay the rest once the "
        "workers have drained the backlog (`passbridge dlq replay` waits for room and goes on in waves)."
    ),
    "purged": "purged {done} of {total} selected",
}


def with_notice(target: str, code: NoticeCode, **counts: int) -> str:
    """``target`` (which may have a query already) with the notice ``code`` to show."""
    return f"{target}{'&' if '?' in target else '?'}{urlencode({'notice': code, **counts})}"


def notice_text(params: Mapping[str, str]) -> str:
    """The text of a query's notice: '' for an unknown code, or counts that are not small whole numbers."""
    template = NOTICES.get(params.get("notice", ""), "")
    counts: dict[str, int] = {}
    for name in ("done", "total", "left"):
        if "{" + name + "}" in template:
            raw = params.get(name, "")
            if not (raw.isascii() and raw.isdigit()) or len(raw) > 9:
                return ""
            counts[name] = int(raw)
    return template.format(**counts)


def _age(ms: int | None, now_ms: int) -> str:
    if ms is None:
        return ""
    delta = (now_ms - ms) / 1000
    text = duration(abs(delta))
    return f"{text} ago" if delta >= 0 else f"in {text}"


def duration(seconds: float) -> str:
    """``4 s``, ``3 min 5 s``, ``2 h 10 min``, ``3 d 4 h``."""
    s = int(seconds)
    if s < 60:
        return f"{seconds:.0f} s" if seconds >= 1 or seconds == 0 else f"{seconds:.1f} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    if s < 86_400:
        return f"{s // 3600} h {s % 3600 // 60} min"
    return f"{s // 86_400} d {s % 86_400 // 3600} h"


def _pretty(doc: Any) -> str:
    return json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=False, default=str)


ENV = Environment(
    loader=PackageLoader("producer.dashboard", "templates"),
    autoescape=select_autoescape(["html"]),
    undefined=StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)
ENV.filters.update(iso=inspect.iso, pretty=_pretty, duration=duration)
ENV.globals.update(url=url)


@dataclass
class Page:
    """One authorized request: the producer's context, the token's CSRF value and a renderer."""

    request: Request
    ctx: ProducerContext
    csrf: str

    @property
    def redis(self) -> Redis:
        return self.ctx.redis

    def q(self, name: str) -> str:
        """A query parameter, stripped ('' when absent)."""
        return self.request.query_params.get(name, "").strip()

    async def render(self, template: str, status: int = 200, **values: Any) -> Response:
        """Render ``template`` with the common values (accounts for the lookup forms, now, CSRF, notice)."""
        now = values.pop("now_ms", None) or int(datetime.now(UTC).timestamp() * 1000)
        html = ENV.get_template(template).render(
            csrf=self.csrf,
            now_ms=now,
            age=functools.partial(_age, now_ms=now),
            all_accounts=await inspect.account_ids(self.redis),
            notice=notice_text(self.request.query_params),
            path=self.request.url.path,
            **values,
        )
        return HTMLResponse(html, status_code=status, headers=SECURITY_HEADERS)

    async def error(self, status: int, message: str) -> Response:
        """An error page naming what is wrong."""
        return await self.render("error.html", status=status, message=message)


Handler = Callable[[Page], Awaitable[Response]]


def _login_page(request: Request, *, status: int, error: str = "", next_url: str = "/dashboard") -> Response:
    html = ENV.get_template("login.html").render(error=error, next_url=next_url)
    headers = dict(SECURITY_HEADERS)
    if status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="passbridge dashboard"'
    return HTMLResponse(html, status_code=status, headers=headers)


def _token(request: Request) -> str | None:
    ctx: ProducerContext = request.app.state.ctx
    token = ctx.settings.admin_token
    return token.get_secret_value() if token is not None and token.get_secret_value() else None


def _disabled() -> Response:
    return HTMLResponse(
        "<!doctype html><title>passbridge</title><p>The dashboard is off: set PASSBRIDGE_ADMIN_TOKEN.</p>",
        status_code=404,
        headers=SECURITY_HEADERS,
    )


def protected(handler: Handler) -> Callable[[Request], Awaitable[Response]]:
    """Run ``handler`` only for holders of the admin token; others get the login form with a 401."""

    @functools.wraps(handler)
    async def route(request: Request) -> Response:
        token = _token(request)
        if token is None:
            return _disabled()
        ctx: ProducerContext = request.app.state.ctx
        if not (auth.bearer_ok(request, token) or await auth.cookie_ok(request, token, ctx.redis)):
            if request.headers.get("x-dashboard-fragment"):
                return Response(
                    "session expired",
                    status_code=401,
                    headers={**SECURITY_HEADERS, "WWW-Authenticate": 'Bearer realm="passbridge dashboard"'},
                )
            target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            return _login_page(
                request, status=401, next_url=target if request.method == "GET" else "/dashboard"
            )
        return await handler(Page(request, ctx, auth.csrf_value(token)))

    return route


async def _form(page: Page) -> dict[str, Any]:
    form = await page.request.form()
    out: dict[str, Any] = {k: str(v).strip() for k, v in form.items()}
    out["ids"] = [str(v).strip() for v in form.getlist("ids") if str(v).strip()]
    return out


def _checked(page: Page, form: dict[str, Any]) -> bool:
    token = _token(page.request)
    return token is not None and auth.csrf_ok(page.request, token, str(form.get("csrf", "")))


# --- login -------------------------------------------------------------------------------------------------


async def login_form(request: Request) -> Response:
    """GET /dashboard/login."""
    if _token(request) is None:
        return _disabled()
    return _login_page(request, status=200, next_url=request.query_params.get("next", "/dashboard"))


async def login(request: Request) -> Response:
    """POST /dashboard/login: a right token sets the session cookie and goes on to ``next``."""
    token = _token(request)
    if token is None:
        return _disabled()
    form = await request.form()
    given = str(form.get("token", ""))
    target = str(form.get("next", "/dashboard"))
    if not target.startswith("/dashboard") or "//" in target or "\\" in target:
        target = "/dashboard"
    redis: Redis = request.app.state.ctx.redis
    failures_key = DASHBOARD_LOGIN_FAILURES + (request.client.host if request.client else "unknown")
    if int(await redis.get(failures_key) or 0) >= auth.LOGIN_MAX_FAILURES:
        wait_s = int(await redis.ttl(failures_key))
        if wait_s == -1:
            # A counter without a TTL (see below) would refuse the address for good: it gets its window.
            await redis.expire(failures_key, auth.LOGIN_WINDOW_S)
            wait_s = auth.LOGIN_WINDOW_S
        wait_s = max(1, wait_s)
        response = _login_page(
            request,
            status=429,
            error=f"Too many wrong tokens from your address; try again in {duration(wait_s)}.",
            next_url=target,
        )
        response.headers["Retry-After"] = str(wait_s)
        return response
    if not given or not auth.token_ok(given, token):
        async with redis.pipeline(transaction=True) as pipe:
            pipe.set(failures_key, 0, ex=auth.LOGIN_WINDOW_S, nx=True)
            pipe.incr(failures_key)
            pipe.ttl(failures_key)
            *_, ttl = await pipe.execute()
        if ttl == -1:
            # Before Redis 7 a transaction does not freeze the clock: the key can expire between SET NX and
            # INCR, which then makes it anew without a TTL — a counter (and a refusal) that would never end.
            await redis.expire(failures_key, auth.LOGIN_WINDOW_S)
        return _login_page(request, status=401, error="That is not the admin token.", next_url=target)
    await redis.delete(failures_key)
    response = RedirectResponse(target, status_code=303, headers=SECURITY_HEADERS)
    response.set_cookie(
        auth.COOKIE,
        auth.session_value(token),
        max_age=auth.SESSION_MAX_AGE_S,
        path=auth.COOKIE_PATH,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )
    return response


async def logout(request: Request) -> Response:
    """POST /dashboard/logout: revokes the session on the server and drops the browser's cookie."""
    token = _token(request)
    if token is not None:
        await auth.revoke(request, token, request.app.state.ctx.redis)
    response = RedirectResponse("/dashboard/login", status_code=303, headers=SECURITY_HEADERS)
    response.delete_cookie(auth.COOKIE, path=auth.COOKIE_PATH)
    return response


async def static(request: Request) -> Response:
    """The dashboard's two static files (public: they hold no data)."""
    name = request.path_params["name"]
    if name not in STATIC:
        return Response("not found", status_code=404)
    body = (resources.files("producer.dashboard") / "static" / name).read_bytes()
    return Response(body, media_type=STATIC[name], headers={"Cache-Control": "max-age=300"})


# --- overview ----------------------------------------------------------------------------------------------


def _charts_of(
    a: inspect.AccountOverview, series: inspect.Series, *, width: int, height: int
) -> list[Markup]:
    """Depth/DLQ and in/out throughput charts (plus Klaviyo requests on the wide account page).

    The current bucket's depth and DLQ size are the live figures (samples are taken once per bucket), so a
    chart's last value agrees with the table beside it.
    """
    values: dict[str, list[float | None]] = {k: list(v) for k, v in series.values.items()}
    values["depth"][-1] = a.queue.pending_events
    values["dlq"][-1] = a.queue.dlq
    for name in ("in", "out"):
        values[name] = [(v or 0) / BUCKET_S for v in values[name]]
    values = recent(values, min_points=5 * 60 // BUCKET_S)
    account_id = a.info.account_id
    charts = [
        line_chart(
            f"pending events and DLQ size of {account_id}",
            [Line("pending", values["depth"], "line-depth"), Line("DLQ", values["dlq"], "line-dlq")],
            width=width,
            height=height,
        ),
        line_chart(
            f"events per second in and out of {account_id}",
            [Line("in", values["in"], "line-in"), Line("out", values["out"], "line-out")],
            width=width,
            height=height,
            unit="/s",
        ),
    ]
    if width > 400:
        charts.append(
            line_chart(
                f"Klaviyo requests and 429s per 10 s of {account_id}",
                [Line("requests", values["req"], "line-req"), Line("429s", values["429"], "line-429")],
                width=width,
                height=height,
            )
        )
    return charts


async def _overview_values(page: Page) -> dict[str, Any]:
    now, accounts = await inspect.overview(page.redis)
    rows = []
    for a in accounts:
        series = await inspect.activity_series(page.redis, a.info.account_id, now / 1000, minutes=30)
        rows.append({"a": a, "doc": a.to_doc(now), "charts": _charts_of(a, series, width=240, height=48)})
    workers = await inspect.workers(page.redis)
    return {"rows": rows, "workers": [w.to_doc(now) for w in workers], "now_ms": now}


async def overview(page: Page) -> Response:
    """GET /dashboard: every account's queue, rates and charts, and the workers; refreshes itself."""
    return await page.render("overview.html", **await _overview_values(page))


async def overview_fragment(page: Page) -> Response:
    """GET /dashboard/fragment/overview: the live part of the overview."""
    return await page.render("_overview.html", **await _overview_values(page))


async def workers(page: Page) -> Response:
    """GET /dashboard/workers."""
    now = await inspect.now_ms(page.redis)
    docs = [w.to_doc(now) for w in await inspect.workers(page.redis)]
    template = "_workers.html" if page.q("fragment") else "workers.html"
    return await page.render(template, workers=docs, now_ms=now)


async def account(page: Page) -> Response:
    """GET /dashboard/account?account=A: one account's figures, charts, parked and leased serials."""
    account_id = page.q("account")
    if not account_id:
        return await page.error(400, "account: give an account id")
    # As `passbridge status --account`: a typo would otherwise show a normal-looking page of zeros.
    if account_id not in await inspect.account_ids(page.redis):
        return await page.error(
            404, f"no account {account_id!r}: not registered, nothing queued or dead-lettered"
        )
    now = await inspect.now_ms(page.redis)
    a = await inspect.account_overview(page.redis, account_id, now)
    series = await inspect.activity_series(page.redis, account_id, now / 1000, minutes=60)
    charts = _charts_of(a, series, width=720, height=120)
    return await page.render(
        "account.html",
        a=a,
        doc=a.to_doc(now),
        charts=charts,
        parked=await inspect.parked_serials(page.redis, account_id, now),
        leased=await inspect.leased_serials(page.redis, account_id),
        now_ms=now,
    )


# --- serials and events ------------------------------------------------------------------------------------


async def serial(page: Page) -> Response:
    """GET /dashboard/serial?account=A&serial=S."""
    account_id, serial_number = page.q("account"), page.q("serial")
    if not account_id or not serial_number:
        return await page.error(400, "account and serial: give both to look a serial up")
    detail = await inspect.serial_detail(page.redis, account_id, serial_number)
    template = "_serial.html" if page.q("fragment") else "serial.html"
    return await page.render(template, d=detail, doc=detail.to_doc(), now_ms=detail.now_ms)


async def event(page: Page) -> Response:
    """GET /dashboard/event?account=A&id=E: where the event is now, and its history."""
    account_id, event_id = page.q("account"), page.q("id")
    if not account_id or not event_id:
        return await page.error(400, "account and id: give both to look an event up")
    found = await inspect.find_event(page.redis, account_id, event_id, page.ctx.settings.dedup_ttl_s)
    template = "_event.html" if page.q("fragment") else "event.html"
    return await page.render(template, e=found, doc=found.to_doc())


# --- the DLQ -----------------------------------------------------------------------------------------------


def _filter(values: dict[str, Any], *, now_ms: int | None = None) -> DLQFilter:
    """The DLQ filter of a query or form; ValueError names the bad field. Ages (``2h``) count back from
    ``now_ms`` when given (Redis time, the clock DLQ scores are on)."""
    now = datetime.fromtimestamp(now_ms / 1000, UTC) if now_ms is not None else None
    since = str(values.get("since") or "")
    until = str(values.get("until") or "")
    try:
        since_ms = inspect.parse_when(since, now=now) if since else None
    except ValueError as exc:
        raise ValueError(f"since: {exc}") from None
    try:
        until_ms = inspect.parse_when(until, now=now) if until else None
    except ValueError as exc:
        raise ValueError(f"until: {exc}") from None
    return DLQFilter(
        code=str(values.get("code") or "") or None,
        serial=str(values.get("serial") or "") or None,
        since_ms=since_ms,
        until_ms=until_ms,
    )


def _ms_field(form: dict[str, Any], name: str) -> int | None:
    """An epoch-ms hidden field of the confirmation form ('' = none); ValueError names it."""
    raw = str(form.get(name) or "")
    if not raw:
        return None
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 15:
        raise ValueError(f"{name}: must be epoch milliseconds (digits only)")
    return int(raw)


def _selection_digest(chosen: dict[str, list[str]]) -> str:
    """What the confirmation page showed, in a form field's worth: a hash of every (account, DLQ id) selected.

    DLQ ids, not event ids: two entries of one event id (sent again after the dedup window) are two. An id
    reused meanwhile (``x#2`` replayed, a new ``x#2`` dead-lettered) is not selected again: the new entry is
    later than the preview's fixed ``until``."""
    h = hashlib.sha256()
    for account_id in sorted(chosen):
        for dlq_id in sorted(chosen[account_id]):
            h.update(f"{account_id}\0{dlq_id}\n".encode())
    return h.hexdigest()


async def _newest(
    redis: Redis, accounts: list[str], flt: DLQFilter, budget: dlq.Budget
) -> list[tuple[str, dlq.DLQEntry]]:
    """The ``DLQ_PAGE`` newest entries matching ``flt`` across ``accounts``: a merge of each account's entries
    read newest first, so only what is shown (plus a page per account) is read."""
    streams = {a: dlq.iter_entries(redis, a, flt, budget=budget, newest_first=True) for a in accounts}
    heap: list[tuple[int, int, str, dlq.DLQEntry]] = []
    try:
        for n, (a, stream) in enumerate(streams.items()):
            if (entry := await anext(stream, None)) is not None:
                heapq.heappush(heap, (-entry.dead_at_ms, n, a, entry))
        out: list[tuple[str, dlq.DLQEntry]] = []
        while heap and len(out) < DLQ_PAGE:
            _, n, a, entry = heapq.heappop(heap)
            out.append((a, entry))
            if len(out) < DLQ_PAGE and (following := await anext(streams[a], None)) is not None:
                heapq.heappush(heap, (-following.dead_at_ms, n, a, following))
        return out
    finally:
        for stream in streams.values():
            await stream.aclose()


async def dlq_list(page: Page) -> Response:
    """GET /dashboard/dlq: the newest entries across accounts (filtered by account, code, serial, time), and
    every account's DLQ size."""
    params = {k: page.q(k) for k in ("account", "code", "serial", "since", "until")}
    try:
        flt = _filter(params, now_ms=await inspect.now_ms(page.redis))
    except ValueError as exc:
        return await page.error(400, str(exc))
    accounts = [params["account"]] if params["account"] else await inspect.account_ids(page.redis)
    async with page.redis.pipeline(transaction=False) as pipe:
        for account_id in accounts:
            pipe.zcard(account_keys(account_id).dlq)
        totals = {a: int(n) for a, n in zip(accounts, await pipe.execute(), strict=True)}
    budget = dlq.Budget(DLQ_EXAMINE)
    shown = await _newest(page.redis, [a for a in accounts if totals[a]], flt, budget)
    rows = [inspect.dlq_summary(a, entry) for a, entry in shown]
    return await page.render(
        "dlq.html",
        rows=rows,
        totals=totals,
        params=params,
        filtered=any(params.values()),
        limit=DLQ_PAGE,
        examined=budget.examined if budget.exhausted else None,
    )


async def dlq_entry(page: Page) -> Response:
    """GET /dashboard/dlq/entry?account=A&id=D: the payload, every attempt's error, the history; ``id`` is the
    DLQ id (the event id, or ``<event id>#n`` for a later entry of the same event id)."""
    account_id, dlq_id = page.q("account"), page.q("id")
    if not account_id or not dlq_id:
        return await page.error(400, "account and id: give both")
    entry = await dlq.get(page.redis, account_id, dlq_id)
    if entry is None:
        return await page.error(404, f"no dead-lettered event {dlq_id!r} in account {account_id!r}")
    found = await inspect.find_event(page.redis, account_id, entry.event_id, page.ctx.settings.dedup_ttl_s)
    return await page.render(
        "dlq_entry.html",
        account_id=account_id,
        entry=entry,
        summary=inspect.dlq_summary(account_id, entry),
        errors=list(reversed(entry.errors)),
        history=found.history,
        same_id=[e for e in found.dead_letters if e.dlq_id != entry.dlq_id],
    )


async def dlq_replay_one(page: Page) -> Response:
    """POST /dashboard/dlq/replay (account, id): put one entry (``id``: its DLQ id) back into its serial at
    once."""
    form = await _form(page)
    if not _checked(page, form):
        return await page.error(403, "the form is stale or forged (CSRF check failed); reload the page")
    account_id, dlq_id = form.get("account", ""), form.get("id", "")
    if not account_id or not dlq_id:
        return await page.error(400, "account and id: give both")
    entry = await dlq.get(page.redis, account_id, dlq_id)
    if entry is None:
        return await page.error(404, f"no dead-lettered event {dlq_id!r} in account {account_id!r}")
    high_water, reserve = page.ctx.settings.backlog_high_water, page.ctx.settings.replay_reserve
    done = await dlq.replay(
        page.redis,
        account_id,
        [dlq_id],
        high_water=high_water,
        reserve=reserve,
        history_retention_ms=page.ctx.settings.history_retention_s * 1000,
        by="dashboard",
    )
    if done.full:
        return await page.error(
            409,
            f"not replayed: {dlq.backlog_full_message(account_id, done.depth, high_water, reserve, 1)}. "
            "Replay it once the workers have drained the backlog.",
        )
    if not done.replayed:  # replayed or purged since it was read
        return await page.error(404, f"no dead-lettered event {dlq_id!r} in account {account_id!r}")
    target = with_notice(url("/dashboard/event", account=account_id, id=entry.event_id), "replayed-one")
    return RedirectResponse(target, status_code=303, headers=SECURITY_HEADERS)


async def dlq_bulk(page: Page) -> Response:
    """POST /dashboard/dlq/bulk (action=replay|purge, filters or ids): confirm first, then do it.

    The confirmation is bound to what it showed: the preview fixes the time range in absolute Redis time
    (``until`` = the preview's moment, so events dead-lettered later are never included) and posts back a
    digest of the selected ids. If the selection at confirm time differs (another operator replayed or purged
    some meanwhile), nothing is done and the confirmation is shown again with the new numbers.
    """
    form = await _form(page)
    if not _checked(page, form):
        return await page.error(403, "the form is stale or forged (CSRF check failed); reload the page")
    action = form.get("action", "")
    if action not in ("replay", "purge"):
        return await page.error(400, "action: must be replay or purge")
    now = await inspect.now_ms(page.redis)
    try:
        flt = _filter(form, now_ms=now)
        since_ms, until_ms = _ms_field(form, "since_ms"), _ms_field(form, "until_ms")
    except ValueError as exc:
        return await page.error(400, str(exc))
    if until_ms is None:  # a preview: fix the range now, so "2h" and "everything" mean what was shown
        since_ms = flt.since_ms
        until_ms = now if flt.until_ms is None else min(flt.until_ms, now)
    flt = dataclasses.replace(flt, since_ms=since_ms, until_ms=until_ms)
    account_id = form.get("account", "")
    accounts = [account_id] if account_id else await inspect.account_ids(page.redis)
    chosen: dict[str, list[str]] = {}
    budget = dlq.Budget(DLQ_EXAMINE)
    for a in accounts:
        if form["ids"]:
            ids = [
                i
                for i in form["ids"]
                if (e := await dlq.get(page.redis, a, i)) is not None and flt.matches(e)
            ]
        else:
            ids = await dlq.select_ids(page.redis, a, flt, budget=budget)
        if ids:
            chosen[a] = ids
        if budget.exhausted:
            return await page.error(
                400,
                f"code, serial: selecting by them would read more than {DLQ_EXAMINE} dead letters here; "
                "narrow the time range (since, until) or use `passbridge dlq replay|purge`",
            )
    total = sum(len(v) for v in chosen.values())
    digest = _selection_digest(chosen)
    back = url(
        "/dashboard/dlq", **{k: form.get(k, "") for k in ("account", "code", "serial", "since", "until")}
    )
    if total == 0:
        return RedirectResponse(
            with_notice(back, "nothing-matched"), status_code=303, headers=SECURITY_HEADERS
        )
    confirming = form.get("confirm") == "yes"
    if not confirming or form.get("selection") != digest or form.get("total") != str(total):
        preview = [(a, i) for a, ids in chosen.items() for i in ids][:PREVIEW]
        changed = None
        if confirming:
            before = form.get("total", "")
            changed = (
                f"The selection changed since the confirmation page was shown ({before} then, {total} now)."
            )
        # What will not fit under the replay limit now, said before the click (the replay leaves it).
        short: list[tuple[str, int, int]] = []
        if action == "replay":
            for a, ids in chosen.items():
                room = max(0, page.ctx.settings.replay_limit - await dlq.depth(page.redis, a))
                if len(ids) > room:
                    short.append((a, room, len(ids)))
        return await page.render(
            "confirm.html",
            status=409 if changed else 200,
            short_of_room=short,
            limit_text=dlq.limit_text(page.ctx.settings.backlog_high_water, page.ctx.settings.replay_reserve),
            action=action,
            chosen=chosen,
            total=total,
            preview=preview,
            form=form,
            back=back,
            since_ms=since_ms,
            until_ms=until_ms,
            selection=digest,
            changed=changed,
        )
    done = 0
    # A web request does not wait for the workers: each account gets back what fits under its replay limit
    # now (oldest first), and the notice says how many stayed in the DLQ and why (the confirmation page named
    # the accounts short of room).
    left = 0
    for a, ids in chosen.items():
        if action == "replay":
            outcome = await dlq.replay(
                page.redis,
                a,
                ids,
                high_water=page.ctx.settings.backlog_high_water,
                reserve=page.ctx.settings.replay_reserve,
                history_retention_ms=page.ctx.settings.history_retention_s * 1000,
                by="dashboard",
            )
            done += outcome.replayed
            if outcome.full:
                left += len(outcome.left)
        else:
            done += await dlq.purge(page.redis, a, ids)
    if left:
        notice = with_notice(back, "replayed-short", done=done, total=total, left=left)
    else:
        notice = with_notice(back, "replayed" if action == "replay" else "purged", done=done, total=total)
    return RedirectResponse(notice, status_code=303, headers=SECURITY_HEADERS)


def json_block(doc: Any) -> Markup:
    """Pretty JSON, escaped, for a ``<pre>``."""
    return Markup.escape(_pretty(doc))


ENV.filters["json_block"] = json_block
