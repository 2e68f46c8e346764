"""What the HTTP server refuses before it parses a request, and why each limit is there.

One request must not be able to stall the server. Before these limits an 8 MB prompt was read whole, parsed, then
tokenized on the event loop (13.7 s) before the context-length check refused it: meanwhile /health and every other
request waited. The limits, cheapest first:

    body size     Content-Length over --max-body-bytes: 413 before a byte of the body is read (a client that sent
                  "Expect: 100-continue", as curl does for large bodies, never sends it). A body without a length
                  (chunked) is counted as it arrives and refused at the first byte over the limit. The connection is
                  closed with the body unread: a client that writes its whole body before reading any answer
                  (urllib) sees the connection reset rather than the 413; one that reads as it writes sees the 413.
    body time     a body not complete within --body-timeout seconds of the request's arrival: 408. A client that
                  trickles its body (or sends headers and goes quiet) holds a connection, not the server.
    prompt bytes  a prompt whose UTF-8 bytes could not fit the context even if every token were the longest one in
                  the vocabulary (context x the longest token's bytes; byte-level BPE tokens never span more): 400
                  before tokenizing. What passes is tokenized in a worker thread, off the event loop, and checked
                  exactly (inference.check_request).

RequestGuard also stamps each request's arrival (scope["state"]["arrived"], time.time()), the moment latency counts
from: time spent reading the body, tokenizing, waiting for a replica and for a KV-cache slot is the client's too.
"""
import asyncio
import json
import time


class RequestGuard:
    """ASGI middleware: stamps the arrival, refuses a body over `max_body_bytes` (413) or slower than `body_timeout`
    seconds (408), then hands the app the body it read. `refused(status)` is called for each refusal."""

    def __init__(self, app, max_body_bytes: int, body_timeout: float, refused=None):
        self.app, self.max_body_bytes, self.body_timeout, self.refused = app, max_body_bytes, body_timeout, refused

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        scope.setdefault("state", {})["arrived"] = arrived = time.time()
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and not declared.isdigit():
            return await self._refuse(send, 400, "the Content-Length header is not a number")
        if declared is not None and int(declared) > self.max_body_bytes:
            return await self._refuse(send, 413, f"a request body of {int(declared)} bytes is over the limit of "
                                                 f"{self.max_body_bytes} bytes (--max-body-bytes)")
        chunks, size = [], 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), arrived + self.body_timeout - time.time())
            except asyncio.TimeoutError:
                return await self._refuse(send, 408, f"the request body did not arrive within {self.body_timeout:g} "
                                                     f"s (--body-timeout)")
            if message["type"] == "http.disconnect":
                return None  # the client left: nobody to answer
            size += len(message.get("body", b""))
            if size > self.max_body_bytes:
                return await self._refuse(send, 413, f"the request body is over the limit of {self.max_body_bytes} "
                                                     f"bytes (--max-body-bytes)")
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay():  # the body once, as read; then whatever comes next (a disconnect)
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await self.app(scope, replay, send)

    async def _refuse(self, send, status: int, detail: str) -> None:
        if self.refused:
            self.refused(status)
        payload = json.dumps({"detail": detail}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                                (b"connection", b"close")]})  # the unread body: this connection cannot be reused
        await send({"type": "http.response.body", "body": payload})


def longest_token_bytes(tokenizer) -> int:
    """The most bytes one token of a byte-level BPE `tokenizer` stands for (each character of its vocabulary's
    strings is one byte, GPT-2's byte-to-unicode map)."""
    return max(len(token) for token in tokenizer.get_vocab())


def prompt_problem(prompt: str, context: int, longest: int) -> str | None:
    """Why `prompt` cannot fit `context` tokens, known without tokenizing it (None: it may fit)."""
    size = len(prompt.encode("utf-8", errors="surrogatepass"))
    if size > context * longest:
        return (f"the prompt has {size} bytes: at most {context * longest} can fit the context of {context} tokens "
                f"(no token stands for more than {longest} bytes)")
    return None
