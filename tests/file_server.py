"""A file server on 127.0.0.1 for the download tests, laid out as a mirror (utils/runtime/download.py):
the file of https://HOST/PATH is served at /HOST/PATH. It answers Range requests (206, or 416 past the
end) with If-Range on its ETag, and misbehaves on request: drop the connection after some bytes, or
hold a response until the test releases it. It logs every request."""
import hashlib
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def mirror_path(url):
    parts = urllib.parse.urlsplit(url)
    return f"/{parts.netloc}{parts.path}"


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        owner = self.server.owner
        owner.requests.append((self.path, self.headers.get("Range")))
        content = owner.files.get(self.path)
        if content is None:
            self.send_error(404)
            return
        etag = f'"{hashlib.sha1(content).hexdigest()}"'
        asked = self.headers.get("Range")
        start = 0
        if asked and self.headers.get("If-Range") in (None, etag):
            start = int(asked.removeprefix("bytes=").rstrip("-"))
            if start >= len(content):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(content)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(content) - 1}/{len(content)}")
        else:
            self.send_response(200)
        body = content[start:]
        self.send_header("Content-Length", str(len(body)))
        self.send_header("ETag", etag)
        self.end_headers()
        hold = owner.hold.get(self.path)
        if hold is not None:
            hold.wait(60)
        drop = owner.drop_after.pop(self.path, None)
        self.wfile.write(body if drop is None else body[:drop])
        if drop is not None:
            self.close_connection = True


class FileServer:
    def __init__(self):
        self.files = {}  # served path -> content
        self.drop_after = {}  # served path -> bytes sent before the connection drops, once
        self.hold = {}  # served path -> threading.Event the response waits for after its headers
        self.requests = []  # (served path, Range header)
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.owner = self
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    @property
    def base(self):
        return f"http://127.0.0.1:{self.httpd.server_port}"

    def serve(self, url, content):
        """Serve `content` as the mirror's copy of `url`; returns the path it is served at."""
        path = mirror_path(url)
        self.files[path] = content
        return path

    def requests_for(self, path):
        return [asked for served, asked in self.requests if served == path]

    def close(self):
        for event in self.hold.values():
            event.set()
        self.httpd.shutdown()
        self.httpd.server_close()
