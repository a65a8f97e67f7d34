"""A tiny ASGI app for baton's uvicorn example: it says which uvicorn
process and which baton generation answered."""

import os


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    generation = os.environ.get("BATON_GENERATION", "-")
    body = f"hello from uvicorn {os.getpid()}, generation {generation}\n".encode()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", b"text/plain"),
                (b"content-length", str(len(body)).encode()),
                (b"x-baton-generation", generation.encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
