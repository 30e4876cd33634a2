"""Two `dg-edit serve` replicas behind Debian's nginx, with the configuration the repository ships
(dg_edit/serve/deploy/dg-edit-nginx.conf; only its addresses changed): a document sticks to one
replica, where its encoder cache stays warm; when that replica is killed, its requests in flight get a
clear error, its documents move to the other replica (cold there, then warm again) and no other
request is lost.

nginx runs as any user: its own prefix, pid, logs and temp folders under the test's tmp_path, in the
foreground (`daemon off`), on a free loopback port. The replicas are the tiny random model with steady
sampling; requests whose prompt carries `dg_edit.faults.MARKER` run each step 0.3 s slower, so they
are surely in flight when the replica dies.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from importlib import resources
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from dg_edit.config import DOCUMENT_HEADER, REPLICA_HEADER
from dg_edit.faults import MARKER
from dg_edit.serve_process import ServeGroup, ServeProcess

pytestmark = pytest.mark.timeout(300)

STEADY = {"sampling": {"max_denoising_steps": 8, "confidence_threshold": 1e-30, "stability_threshold": 8}}
PREFIX = "import os\n\ndef list_files(path):\n    names = []\n    for name in os.listdir(path):\n        "
SUFFIX = "\n    return names\n"
SHIPPED = {"server 127.0.0.1:8765 ": "a", "server 127.0.0.1:8766 ": "b"}  # the shipped upstream lines
SHIPPED_LISTEN = "listen 127.0.0.1:8080;"


def nginx_binary() -> str | None:
    return shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if Path(p).is_file()), None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shipped_conf() -> str:
    return (resources.files("dg_edit.serve") / "deploy" / "dg-edit-nginx.conf").read_text("utf-8")


class Nginx:
    """nginx in the foreground with its own prefix: the shipped conf.d file, included from a minimal
    nginx.conf that puts every path nginx writes under `folder`."""

    def __init__(self, binary: str, folder: Path, upstreams: dict[str, int]):
        self.folder = folder
        self.port = free_port()
        site = shipped_conf()
        for line, name in SHIPPED.items():
            assert site.count(line) == 1, f"the shipped config no longer lists {line!r}"
            site = site.replace(line, f"server 127.0.0.1:{upstreams[name]} ")
        assert site.count(SHIPPED_LISTEN) == 1
        site = site.replace(SHIPPED_LISTEN, f"listen 127.0.0.1:{self.port};")
        (folder / "dg-edit.conf").write_text(site)
        temp = "".join(f"    {kind}_temp_path {folder / kind};\n" for kind in ("client_body", "proxy", "fastcgi",
                                                                               "uwsgi", "scgi"))
        user = "user root;\n" if os.geteuid() == 0 else ""  # as root, workers would run as nobody
        (folder / "nginx.conf").write_text(
            f"{user}daemon off;\nworker_processes 1;\npid {folder / 'nginx.pid'};\n"
            f"error_log {folder / 'error.log'} info;\nevents {{ worker_connections 256; }}\n"
            f"http {{\n    access_log {folder / 'access.log'};\n{temp}    include {folder / 'dg-edit.conf'};\n}}\n")
        self.command = [binary, "-p", str(folder), "-c", str(folder / "nginx.conf"), "-e", str(folder / "error.log")]
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "Nginx":
        check = subprocess.run([*self.command, "-t"], capture_output=True, text=True)
        assert check.returncode == 0, check.stderr
        self.proc = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log()
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                time.sleep(0.05)
        raise TimeoutError(self.log())

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)  # graceful: the workers finish, then the master exits
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        path = self.folder / "error.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""


@pytest.fixture
def cluster(tiny_model_dir, tmp_path):
    binary = nginx_binary()
    if binary is None:
        pytest.skip("nginx is not installed (tests/run.sh installs Debian's nginx package)")
    config = tmp_path / "steady.json"
    config.write_text(json.dumps(STEADY))
    model = ["--model", str(tiny_model_dir), "--config", str(config)]
    slow = {"DG_EDIT_FAULT": "slow:0.3"}
    group = ServeGroup(a=ServeProcess(model, env=slow), b=ServeProcess(model, env=slow))
    with group:
        nginx_dir = tmp_path / "nginx"
        nginx_dir.mkdir()
        with Nginx(binary, nginx_dir, {name: proc.port for name, proc in group.items()}) as nginx:
            yield nginx, group
    assert group.codes["b"] == 0, group["b"].log()[-3000:]  # the survivor shuts down cleanly


def replica_of(proc: ServeProcess) -> str:
    return httpx.get(proc.url + "/healthz", timeout=30).json()["replica"]


def metrics(proc: ServeProcess) -> dict[str, float]:
    text = httpx.get(proc.url + "/metrics", timeout=30).text
    return {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples if not s.labels}


def complete(client: httpx.Client, document: str, prefix: str = PREFIX, **extra) -> httpx.Response:
    return client.post("/v1/completions", headers={DOCUMENT_HEADER: document},
                       json={"prompt": prefix, "suffix": SUFFIX, "max_tokens": 8, "seed": 1, **extra})


def test_documents_stick_to_a_replica_and_move_when_it_dies(cluster):
    nginx, group = cluster
    replicas = {replica_of(proc): name for name, proc in group.items()}
    assert len(replicas) == 2
    client = httpx.Client(base_url=nginx.url, timeout=120)

    # 1. Affinity: every request naming a document lands on one replica; documents spread over both.
    def lands_on(document: str) -> str:
        return replicas[client.get("/healthz", headers={DOCUMENT_HEADER: document}).headers[REPLICA_HEADER]]

    owner = {doc: lands_on(doc) for doc in (f"src/module_{i}.py" for i in range(16))}
    assert set(owner.values()) == {"a", "b"}, owner  # 16 documents, 2 replicas: both get some
    for doc, name in owner.items():
        assert {lands_on(doc) for _ in range(3)} == {name}
    doc_a = next(doc for doc, name in owner.items() if name == "a")
    doc_b = next(doc for doc, name in owner.items() if name == "b")
    # A browser's websocket names its document with ?doc= and lands where the header does.
    for doc in (doc_a, doc_b):
        async def handshake(doc=doc) -> str:
            async with connect(nginx.url.replace("http", "ws") + f"/ws?doc={doc}") as ws:
                return ws.response.headers[REPLICA_HEADER]
        assert replicas[asyncio.run(handshake())] == owner[doc]

    # 2. Warm cache: the second request for a document re-encodes less of its prefix than the first,
    # on the replica that owns it; the other replica runs nothing for it.
    for expected_encoding in ("cold", "warm"):
        before = {name: metrics(proc) for name, proc in group.items()}
        response = complete(client, doc_a)
        assert response.status_code == 200, response.text
        assert replicas[response.headers[REPLICA_HEADER]] == "a"
        after = {name: metrics(proc) for name, proc in group.items()}
        prefix = after["a"]["dg_edit_prefix_tokens_total"] - before["a"]["dg_edit_prefix_tokens_total"]
        encoded = after["a"]["dg_edit_prefix_tokens_encoded_total"] - before["a"]["dg_edit_prefix_tokens_encoded_total"]
        assert prefix > 0
        assert encoded == prefix if expected_encoding == "cold" else encoded < prefix, (expected_encoding, encoded,
                                                                                        prefix)
        assert after["b"]["dg_edit_prefix_tokens_total"] == before["b"]["dg_edit_prefix_tokens_total"]

    # 3. Requests in flight on both replicas (slow: 8 steps of 0.3 s), then replica a is killed.
    slow_prefix = f"# {MARKER}\n" + PREFIX

    async def in_flight() -> dict:
        async with httpx.AsyncClient(base_url=nginx.url, timeout=120) as http:
            async def whole(document: str) -> httpx.Response:
                return await http.post("/v1/completions", headers={DOCUMENT_HEADER: document},
                                       json={"prompt": slow_prefix, "suffix": SUFFIX, "max_tokens": 8, "seed": 2})

            streaming = {doc_a: asyncio.Event(), doc_b: asyncio.Event()}

            async def streamed(document: str) -> tuple[int, list[str], BaseException | None]:
                # drafts: an event per step, so the stream (its 200) begins at the first step, not at the end
                lines: list[str] = []
                try:
                    async with http.stream("POST", "/infill", headers={DOCUMENT_HEADER: document},
                                           json={"input_prefix": slow_prefix, "input_suffix": SUFFIX, "n_predict": 8,
                                                 "seed": 3, "stream": True, "drafts": True}) as response:
                        streaming[document].set()
                        async for line in response.aiter_lines():
                            lines.append(line)
                        return response.status_code, lines, None
                except httpx.HTTPError as e:
                    return -1, lines, e

            async def websocket(document: str) -> dict | BaseException:
                try:
                    async with connect(nginx.url.replace("http", "ws") + f"/ws?doc={document}") as ws:
                        await ws.send(json.dumps({"type": "infill", "id": "w", "prefix": slow_prefix, "suffix": SUFFIX,
                                                  "max_new_tokens": 8, "seed": 4}))
                        while (frame := json.loads(await ws.recv()))["type"] == "step":
                            pass
                        return frame
                except ConnectionClosed as e:
                    return e

            tasks = {f"{kind} {name}": asyncio.create_task(fn(doc))
                     for name, doc in (("a", doc_a), ("b", doc_b))
                     for kind, fn in (("whole", whole), ("stream", streamed), ("ws", websocket))}
            # every one of them running on its replica, the streams begun, then replica a dies
            await asyncio.wait_for(asyncio.gather(*(event.wait() for event in streaming.values())), 60)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                running = {name: httpx.get(proc.url + "/healthz", timeout=30).json()["inflight"]
                           for name, proc in group.items()}
                if running == {"a": 3, "b": 3}:
                    break
                await asyncio.sleep(0.05)
            assert running == {"a": 3, "b": 3}, running
            os.killpg(group["a"].proc.pid, signal.SIGKILL)
            return {key: await task for key, task in tasks.items()}

    results = asyncio.run(in_flight())
    # Replica a's requests in flight: a clear error, never a silently cut answer.
    whole_a = results["whole a"]
    assert whole_a.status_code == 502, whole_a.text
    assert "replica" in whole_a.json()["error"]["message"] and whole_a.headers.get("retry-after") == "1"
    # A stream that had begun ends without its final event, as a transport error (not a clean end).
    status, lines, error = results["stream a"]
    assert isinstance(error, httpx.RemoteProtocolError), (status, lines, error)
    assert any(line.startswith("event: draft") for line in lines), lines
    assert not any('"stop":true' in line for line in lines), lines
    assert isinstance(results["ws a"], ConnectionClosed), results["ws a"]
    # Replica b's requests: all answered in full.
    assert results["whole b"].status_code == 200, results["whole b"].text
    assert results["whole b"].json()["choices"][0]["finish_reason"] in ("stop", "length")
    status, lines, error = results["stream b"]
    data = [line for line in lines if line.startswith("data:")]
    assert error is None and status == 200 and '"stop":true' in data[-1], (status, lines, error)
    assert results["ws b"]["type"] == "done", results["ws b"]

    # 4. Document a moves to replica b: answered there, cold (its whole prefix encoded), then warm.
    group["a"].proc.wait(10)
    for expected_encoding in ("cold", "warm"):
        before = metrics(group["b"])
        response = complete(client, doc_a)
        assert response.status_code == 200, response.text
        assert replicas[response.headers[REPLICA_HEADER]] == "b"
        after = metrics(group["b"])
        prefix = after["dg_edit_prefix_tokens_total"] - before["dg_edit_prefix_tokens_total"]
        encoded = after["dg_edit_prefix_tokens_encoded_total"] - before["dg_edit_prefix_tokens_encoded_total"]
        assert prefix > 0
        assert encoded == prefix if expected_encoding == "cold" else encoded < prefix, (expected_encoding, encoded,
                                                                                        prefix)
    # Document b never moved.
    response = complete(client, doc_b)
    assert response.status_code == 200 and replicas[response.headers[REPLICA_HEADER]] == "b"
    client.close()
