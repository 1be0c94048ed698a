"""A real S3 endpoint for tests: moto's standalone server on a loopback port.

`S3Server.start()` runs ``moto_server`` (pinned ``moto[server]``) on 127.0.0.1, waits until it
answers, and creates `bucket`. These environment variables make ``s3://<bucket>/…`` reach it from
s3fs (via botocore) in this process and in any subprocess or Ray worker given them -- `env`:

    AWS_ENDPOINT_URL=http://127.0.0.1:<port>   the endpoint of every AWS service (botocore >= 1.31)
    AWS_ACCESS_KEY_ID=testing                   any value: moto accepts every key
    AWS_SECRET_ACCESS_KEY=testing
    AWS_DEFAULT_REGION=us-east-1

The `s3` fixture (tests/conftest.py) sets them with monkeypatch
and clears fsspec's instance cache, so filesystems made before do not keep another endpoint.
`stop()` sends SIGTERM, then kills the server if it has not exited within a few seconds.
"""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

from tests.support.ports import free_port

START_SECONDS = 30.0


class S3Server:
    """moto_server on 127.0.0.1:`port`, with one bucket."""

    def __init__(self, port: int | None = None, bucket: str | None = None) -> None:
        self.port = port or free_port()
        self.bucket = bucket or f"store-{uuid.uuid4().hex[:12]}"
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def env(self) -> dict[str, str]:
        """The environment variables that point botocore (and so s3fs) at this server."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "testing",
                "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}

    def url(self, *parts: str) -> str:
        return "/".join([f"s3://{self.bucket}", *parts])

    def start(self) -> "S3Server":
        binary = Path(sys.executable).with_name("moto_server")
        self._process = subprocess.Popen([str(binary), "-H", "127.0.0.1", "-p", str(self.port)],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + START_SECONDS
        while True:
            if self._process.poll() is not None:
                raise RuntimeError(f"moto_server exited with {self._process.returncode} before answering")
            try:
                urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"moto_server did not answer on {self.endpoint} within {START_SECONDS} s")
                time.sleep(0.1)
        request = urllib.request.Request(f"{self.endpoint}/{self.bucket}", method="PUT")
        urllib.request.urlopen(request, timeout=5).close()
        return self

    def stop(self) -> None:
        if self._process is None or self._process.poll() is not None:
            return
        self._process.terminate()
        try:
            self._process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()


def clear_fsspec_instances() -> None:
    """Forget s3fs's cached filesystem instances (one per set of arguments, made with the endpoint of then)."""
    import fsspec

    fsspec.get_filesystem_class("s3").clear_instance_cache()
