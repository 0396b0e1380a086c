"""A stand-in for the Kubernetes API server, on loopback only, for testing `gnr jobs` and `--wait`.

No API server can run on these machines (no container engine, none in the package registries), so
the tests go up to the edge: the real `kubernetes` client, configured by a real kubeconfig, talks
HTTP to this tiny server, which answers the few REST paths gnr calls with canned objects and
records every request (method, path, query, body) for the tests to assert on.
"""

from __future__ import annotations

import json
import threading
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

Answer = tuple[int, object]  # (status, JSON body or raw bytes)


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    body: object


class FakeKube:
    def __init__(self) -> None:
        self.routes: dict[tuple[str, str], Answer | Callable[[Request], Answer]] = {}
        self.requests: list[Request] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def on(self, method: str, path: str, answer: Answer | Callable[[Request], Answer]) -> None:
        self.routes[(method, path)] = answer

    def calls(self, method: str | None = None) -> list[Request]:
        return [r for r in self.requests if method in (None, r.method)]

    def kubeconfig(self, directory: Path) -> Path:
        path = directory / "kubeconfig"
        path.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "fake", "user": {"token": "not-a-secret"}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}],
        }))
        return path

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                url = urllib.parse.urlsplit(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                req = Request(self.command, url.path, dict(urllib.parse.parse_qsl(url.query)),
                              json.loads(raw) if raw else None)
                fake.requests.append(req)
                answer = fake.routes.get((req.method, req.path), (404, {"kind": "Status", "code": 404, "reason": "NotFound"}))
                status, body = answer(req) if callable(answer) else answer
                if isinstance(body, dict) and "items" in body and "labelSelector" in req.query:
                    body = {**body, "items": _select(body["items"], req.query["labelSelector"])}
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "text/plain" if isinstance(body, bytes) else "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_DELETE = do_POST = _answer

            def log_message(self, *args) -> None:  # keep test output clean
                pass

        return Handler


def _select(items: list[dict], selector: str) -> list[dict]:
    """What the API server does with an equality label selector (a=b,c=d)."""
    wanted = dict(term.split("=", 1) for term in selector.split(","))
    return [i for i in items if wanted.items() <= (i["metadata"].get("labels") or {}).items()]


@pytest.fixture()
def fake_kube(tmp_path):
    """(server, env): a FakeKube and the environment that points kubectl-style clients at it."""
    server = FakeKube()
    yield server, {"KUBECONFIG": str(server.kubeconfig(tmp_path)), "GNR_NAMESPACE": "gnr"}
    server.close()


def job_object(kind: str, name: str, run_id: str, task: str = "train", conditions=(),
               created="2026-11-25T10:00:00Z") -> dict:
    """A job as the API returns it, labelled the way the chart labels it."""
    return {"kind": kind, "metadata": {
        "name": name, "namespace": "gnr", "creationTimestamp": created,
        "labels": {"app.kubernetes.io/name": "gnr", "app.kubernetes.io/instance": name,
                   "app.kubernetes.io/component": task, "gnr/run-id": run_id}},
        "status": {"conditions": [{"type": t, "status": "True", "message": m} for t, m in conditions]}}


def pod_object(name: str, job: dict, phase: str = "Running", restarts: int = 0, node: str = "gpu-node-1") -> dict:
    """A pod of ``job`` (it carries the job's labels, as the chart's pod templates do)."""
    return {"kind": "Pod", "metadata": {"name": name, "namespace": "gnr", "labels": job["metadata"]["labels"]},
            "spec": {"nodeName": node, "containers": [{"name": "pytorch", "image": "gnr:0.1.0"}]},
            "status": {"phase": phase, "containerStatuses": [
                {"name": "pytorch", "restartCount": restarts, "ready": phase == "Running", "image": "gnr:0.1.0",
                 "imageID": "", "containerID": ""}]}}


def listing(*items: dict) -> tuple[int, dict]:
    return 200, {"kind": "List", "apiVersion": "v1", "metadata": {}, "items": list(items)}
