"""The /metrics HTTP endpoint shared by the worker and the --no-ray selector: prometheus_client's threaded
WSGI server on one registry, with a stop that the event loop can wait for."""

from __future__ import annotations

import threading
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server


class MetricsEndpoint:
    def __init__(self, registry: CollectorRegistry, owner: str):
        self.registry = registry
        self.owner = owner  # whose endpoint, for the error message ("worker", "selector")
        self._http: tuple[WSGIServer, threading.Thread] | None = None

    def serve(self, host: str, port: int) -> int:
        """Serve /metrics on host:port (0: a free port); returns the bound port."""
        if self._http is not None:
            raise RuntimeError(f"the {self.owner}'s metrics endpoint is already serving")
        self._http = start_http_server(port, addr=host, registry=self.registry)
        return self._http[0].server_address[1]

    @property
    def port(self) -> int | None:
        return None if self._http is None else self._http[0].server_address[1]

    def close(self) -> None:
        """Stop the endpoint (blocks up to the server's 0.5 s poll interval). Idempotent."""
        if self._http is not None:
            server, thread = self._http
            self._http = None
            server.shutdown()
            server.server_close()
            thread.join()
