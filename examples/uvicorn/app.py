"""A tiny ASGI app for baton's uvicorn example (hypercorn serves it too): it
says which server process and which baton generation answered. `/ws` is a
WebSocket echo that greets with its generation (uvicorn speaks WebSocket
when `websockets` or `wsproto` is installed)."""

import os
import sys

GENERATION = os.environ.get("BATON_GENERATION", "-")
SERVER = os.path.basename(sys.argv[0])


async def app(scope, receive, send):
    if scope["type"] == "websocket":
        await echo(receive, send)
        return
    if scope["type"] != "http":
        return
    body = f"hello from {SERVER} {os.getpid()}, generation {GENERATION}\n".encode()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", b"text/plain"),
                (b"content-length", str(len(body)).encode()),
                (b"x-baton-generation", GENERATION.encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def echo(receive, send):
    """Greets with the generation, then echoes text until either side closes."""
    if (await receive())["type"] != "websocket.connect":
        return
    await send({"type": "websocket.accept"})
    await send({"type": "websocket.send", "text": f"generation {GENERATION}"})
    while True:
        message = await receive()
        if message["type"] != "websocket.receive":
            return
        if message.get("text") is not None:
            await send({"type": "websocket.send", "text": message["text"]})
