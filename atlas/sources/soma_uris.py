"""Whether a member of a TileDB-SOMA group lies inside it: a group's members are URIs, and one naming another
location would read data the user did not give."""

from __future__ import annotations


def member_inside(root: str, member: str) -> bool:
    """Whether the member URI ``member`` lies under the experiment URI ``root``: no ``..`` segment (literal or
    percent-encoded), and, for local paths, under the root with symlinks resolved both as written and with
    percent-escapes decoded (a reader may take ``%2F`` either way: a member must be inside under both readings);
    other schemes compared as text."""
    from pathlib import Path
    from urllib.parse import unquote, urlparse

    def parts(uri: str) -> list[str]:
        return [*uri.split("/"), *unquote(uri).split("/")]

    if ".." in parts(urlparse(member).path if "://" in member else member):
        return False

    def local(uri: str, decode: bool) -> Path | None:
        parsed = urlparse(uri)
        if parsed.scheme in ("", "file"):
            path = parsed.path if parsed.scheme else uri
            return Path(unquote(path) if decode else path).resolve()
        return None

    for decode in (False, True):
        r, m = local(root, decode), local(member, decode)
        if r is None and m is None:
            return member.startswith(root.rstrip("/") + "/")
        if r is None or m is None or not m.is_relative_to(r):
            return False
    return True
