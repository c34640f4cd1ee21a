"""A moto S3 server in this process on 127.0.0.1 that counts the bytes it sends per object (the GET
responses' bodies): what a reader really fetched. Used by tests/test_checkpoint_resume_io.py and
benchmarks/checkpoint_io.py."""
from __future__ import annotations

import collections
import os
import threading

S3_ENV = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")


class GetBytes:
    """WSGI middleware: response body bytes of GET requests, per request path."""

    def __init__(self, app):
        self.app, self.lock, self.sent = app, threading.Lock(), collections.Counter()

    def __call__(self, environ, start_response):
        body = self.app(environ, start_response)
        if environ["REQUEST_METHOD"] != "GET":
            return body
        return self._counted(environ["PATH_INFO"], body)

    def _counted(self, path, body):
        try:
            for chunk in body:
                with self.lock:
                    self.sent[path] += len(chunk)
                yield chunk
        finally:
            if hasattr(body, "close"):
                body.close()

    def take(self) -> collections.Counter:
        """The bytes sent per path since the last take()."""
        with self.lock:
            sent, self.sent = self.sent, collections.Counter()
        return sent


class CountingS3:
    """start(): serve moto's S3 on 127.0.0.1:port, point this process's AWS_* variables (boto3, pyarrow
    and the processes it starts) at it, create `bucket`; stop(): shut it down, restore the variables."""

    def __init__(self, port: int, bucket: str):
        self.port, self.bucket = port, bucket
        self.counter: GetBytes | None = None
        self._server = self._thread = None
        self._saved: dict[str, str | None] = {}

    def start(self) -> GetBytes:
        from moto.server import DomainDispatcherApplication, create_backend_app
        from werkzeug.serving import make_server

        self.counter = GetBytes(DomainDispatcherApplication(create_backend_app))
        self._server = make_server("127.0.0.1", self.port, self.counter, threaded=True)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        self._saved = {key: os.environ.get(key) for key in S3_ENV}
        os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{self.port}", AWS_ACCESS_KEY_ID="testing",
                          AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
        import boto3

        boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"]).create_bucket(Bucket=self.bucket)
        return self.counter

    def stop(self) -> None:
        self._server.shutdown()
        self._thread.join(timeout=30)
        for key, value in self._saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
