"""Reading a request to the server (kdistill.deploy.serve, and the OpenAI-compatible API's routes): its body within
a size limit (an oversized one drained before the 413), its Content-Type (JSON in UTF-8, or a 415), its JSON
parsed strictly (UTF-8 only, no key twice in one object, or a 400 with one line), and whether its client hung up
(499, nginx's code for it).
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import HTTPException, Request
from fastapi.responses import Response
from starlette.requests import ClientDisconnect

DRAIN_LIMIT_BYTES = 64 * 2**20
"""An oversized body is read and dropped up to this many bytes before the 413 goes out: a client that sends the
whole body before reading the answer (Python's urllib, requests) sees a broken pipe, not the 413, when the
connection closes under it. A larger body is not worth the bandwidth: its connection is just closed."""
CLIENT_CLOSED_REQUEST = 499  # nginx's code for "the client hung up first"; nobody reads it, the log does


async def read_json(request: Request, max_body_bytes: int) -> Any:
    """A request's JSON body, through the size, content-type and strict-JSON checks."""
    body = await read_body(request, max_body_bytes)
    check_content_type(request.headers.get("content-type"))
    if not body.strip():
        raise HTTPException(400, "malformed JSON: the request body is empty")
    return parse_json(body)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, or 413 when the declared or received size passes `limit` bytes.

    An oversized body is drained (read and dropped, up to DRAIN_LIMIT_BYTES past the limit) before the 413, unless
    the client asked "Expect: 100-continue" and so has not sent it yet.
    """
    declared = request.headers.get("content-length")
    size = None
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise HTTPException(400, "invalid Content-Length header") from None
    too_big = (f"request body is {size} bytes (at most {limit})" if size is not None
               else f"request body is over {limit} bytes")  # fmt: skip
    if size is not None and size > limit and (
        size > limit + DRAIN_LIMIT_BYTES or request.headers.get("expect", "").lower() == "100-continue"
    ):
        raise HTTPException(413, too_big)
    chunks, received = [], 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received <= limit:
                chunks.append(chunk)
            elif received > limit + DRAIN_LIMIT_BYTES:
                break
    except ClientDisconnect:
        raise HTTPException(CLIENT_CLOSED_REQUEST, "client disconnected while sending the body") from None
    if received > limit or (size is not None and size > limit):
        raise HTTPException(413, too_big)
    return b"".join(chunks)


def check_content_type(value: str | None) -> None:
    """415 unless the request says its body is JSON in UTF-8: `application/json`, with no charset or utf-8."""
    media, *params = (value or "").split(";")
    charset = next((v.strip().strip('"').lower() for k, _, v in (p.partition("=") for p in params)
                    if k.strip().lower() == "charset"), "utf-8")
    if media.strip().lower() != "application/json" or charset != "utf-8":
        got = repr(value) if value is not None else "none"
        raise HTTPException(415, f"unsupported Content-Type {got}; send the body as application/json "
                            "(charset utf-8, or none)")


UTF16_32_BOMS = (b"\xff\xfe", b"\xfe\xff", b"\x00\x00\xfe\xff")
"""Byte order marks of UTF-16 (LE, BE) and UTF-32 (LE starts with UTF-16 LE's; BE): a body that starts with one
is not UTF-8. (json.loads on bytes would guess such encodings; an API that says UTF-8 does not.)"""


class _DuplicateKey(Exception):
    pass


def _object(pairs: list[tuple[str, Any]]) -> dict:
    # json.loads keeps the last of two equal keys; which text was meant is the client's call, not ours
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            raise _DuplicateKey(key)
        seen.add(key)
    return dict(pairs)


def parse_json(body: bytes) -> Any:
    """The JSON value of a request body that must be UTF-8 (a leading UTF-8 BOM is ignored, as RFC 8259 allows);
    400 with one line for another encoding, invalid bytes, malformed JSON or a key given twice in one object."""
    if body.startswith(UTF16_32_BOMS) or b"\x00" in body:  # (JSON text never holds a raw NUL; UTF-16/32 ASCII does)
        raise HTTPException(400, "malformed JSON: the body is not UTF-8 (it looks like UTF-16 or UTF-32); "
                            "send JSON encoded as UTF-8")
    try:
        text = body.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        at = e.start + len(body) - len(e.object)  # e.object lacks the BOM the decoder dropped
        raise HTTPException(400, f"malformed JSON: the body is not UTF-8 (invalid byte at {at}); "
                            "send JSON encoded as UTF-8") from None
    try:
        return json.loads(text, object_pairs_hook=_object)
    except _DuplicateKey as e:  # (repr: a key may hold a line break or an unpaired surrogate)
        raise HTTPException(400, f"malformed JSON: key {e.args[0]!r} appears twice in one object; "
                            "give each key once") from None
    except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
        raise HTTPException(400, f"malformed JSON: {e}") from None


async def client_gone(request: Request) -> None:
    """Returns once the client has hung up. Called after the body was read, so the next ASGI message is the
    disconnect (servers send it when the connection drops, or after the response)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def hung_up(request: Request) -> Response:
    """The answer to a client that hung up, once it has (client_gone)."""
    await client_gone(request)
    return Response(status_code=CLIENT_CLOSED_REQUEST)
