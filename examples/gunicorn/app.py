"""A tiny WSGI app for baton's gunicorn example: it says which gunicorn
worker and which baton generation answered."""

import os


def application(environ, start_response):
    generation = os.environ.get("BATON_GENERATION", "-")
    body = f"hello from gunicorn worker {os.getpid()}, generation {generation}\n".encode()
    start_response(
        "200 OK",
        [
            ("Content-Type", "text/plain"),
            ("Content-Length", str(len(body))),
            ("X-Baton-Generation", generation),
        ],
    )
    return [body]
