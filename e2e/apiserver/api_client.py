"""A minimal JSON client for the kube-apiserver, for the fake kubelet (no client library needed)."""

from __future__ import annotations

import http.client
import json
import ssl
import threading
import urllib.parse


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


class Api:
    """A minimal JSON client for the API server: one keep-alive connection per thread."""

    def __init__(self, url: str, context: ssl.SSLContext, timeout: float = 10) -> None:
        parts = urllib.parse.urlsplit(url)
        self.host, self.port = parts.hostname, parts.port or 443
        self.context, self.timeout = context, timeout
        self._local = threading.local()

    def request(self, method: str, path: str, body: object = None, content_type: str = "application/json") -> dict:
        data = None if body is None else json.dumps(body).encode()
        headers = {"Accept": "application/json", "Content-Type": content_type}
        for attempt in range(2):
            conn = getattr(self._local, "conn", None)
            if conn is None:
                conn = self._local.conn = http.client.HTTPSConnection(self.host, self.port, context=self.context,
                                                                      timeout=self.timeout)
            try:
                conn.request(method, path, body=data, headers=headers)
                response = conn.getresponse()
                raw = response.read()
            except (OSError, http.client.HTTPException):
                conn.close()
                self._local.conn = None
                if attempt:
                    raise
                continue  # a stale keep-alive connection: once more on a fresh one
            payload = json.loads(raw) if raw else {}
            if response.status >= 400:
                raise ApiError(response.status, payload.get("message", raw[:300].decode(errors="replace")))
            return payload
        raise AssertionError("unreachable")
