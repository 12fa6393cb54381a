"""The site guard. Binding 127.0.0.1 keeps other machines out, but not a web page in the user's
own browser: any site can send requests to http://127.0.0.1:8000, and a DNS-rebinding site can
even read the answers. `guard_site` answers only requests addressed to this server by name (the
Host header) and refuses requests sent by another site's page (the Origin header), so only this
server's own page, curl and scripts can drive it."""

from urllib.parse import urlsplit

from fastapi.responses import JSONResponse

LOOPBACK = ("127.0.0.1", "localhost", "::1")
WILDCARD = ("0.0.0.0", "::")
CHANGES_STATE = {"POST", "PUT", "PATCH", "DELETE"}
ENTRY_PAGES = {"/", "/docs"}  # what a link on another site may open: the pages, never the API behind them


def allowed_hosts(host, port, extra=()):
    """{(name, port)} this server answers to: the address it is bound to (a loopback or wildcard
    bind: this machine's loopback names), plus each `extra` "name" or "name:port". Port None: any."""
    names = LOOPBACK if host in LOOPBACK or host in WILDCARD else (host,)
    return {(n, port) for n in names} | {host_and_port(e) for e in extra}


def host_and_port(netloc, default_port=None):
    """"Name:port" (or "[v6]:port") -> (lower-case name, port); (None, None) if malformed."""
    try:
        u = urlsplit("//" + netloc)
        return u.hostname, u.port or default_port
    except ValueError:
        return None, None


def is_ours(netloc, hosts, default_port=80):
    name, port = host_and_port(netloc, default_port)
    return (name, port) in hosts or (name, None) in hosts


def guard_site(app, hosts):
    """Refuse what another web page can make the user's browser send: a request whose Host header
    is not one of `hosts` (DNS rebinding: evil.example resolved to 127.0.0.1), and a request from
    another site's page (cross-site request forgery): 403 both. Another site is told by Origin,
    else Referer, else the browser's Sec-Fetch-Site. Reads count too (a GET of step_time runs a
    training probe), except opening ENTRY_PAGES from a link. A request without any of those
    headers (curl, a script) comes from no site: allowed."""

    @app.middleware("http")
    async def same_site_only(request, call_next):
        host = request.headers.get("host", "")
        if not is_ours(host, hosts):
            return JSONResponse({"error": f"this server does not answer to the name {host[:100]!r}; if that is "
                                          f"how you reach it, start it with --allowed-host NAME"}, status_code=403)
        sender = request.headers.get("origin") or request.headers.get("referer")
        guarded = request.method in CHANGES_STATE or request.url.path not in ENTRY_PAGES
        if guarded and from_another_site(sender, request.headers.get("sec-fetch-site"), hosts):
            return JSONResponse({"error": f"refused a cross-site request: a page from {(sender or 'another site')[:100]!r} "
                                          f"may not use this server; use this server's own page"}, status_code=403)
        return await call_next(request)


def from_another_site(sender, fetch_site, hosts):
    """Was the request sent by a page of another site? `sender` is its Origin or Referer URL;
    without one, a browser's Sec-Fetch-Site says (a page may send no Referer, never a wrong one)."""
    if sender is not None:
        u = urlsplit(sender)
        return not is_ours(u.netloc, hosts, {"https": 443}.get(u.scheme, 80))
    return fetch_site in ("cross-site", "same-site")
