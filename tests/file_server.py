"""A file server on 127.0.0.1 for the download tests, laid out as a mirror (utils/runtime/download.py):
the file of https://HOST/PATH is served at /HOST/PATH. It answers Range requests (206, or 416 past the
end) with If-Range on its ETag, and misbehaves on request: drop the connection after some bytes, stall
after some bytes (send nothing more until the server closes), hold a response until the test releases
it, send no Content-Length, send another Content-Type (a web page's), or redirect to another address.
It logs every request."""
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
        moved = owner.redirect.get(self.path)
        if moved is not None:
            self.send_response(302)
            self.send_header("Location", moved)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
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
        if self.path not in owner.no_length:  # without it the body ends where the connection closes
            self.send_header("Content-Length", str(len(body)))
        self.send_header("Content-Type", owner.content_type.get(self.path, "application/octet-stream"))
        self.send_header("ETag", etag)
        self.end_headers()
        hold = owner.hold.get(self.path)
        if hold is not None:
            hold.wait(60)
        stall = owner.stall_after.pop(self.path, None)
        if stall is not None:
            self.wfile.write(body[:stall])
            self.wfile.flush()
            owner.closing.wait(60)  # the client gives up first: its read times out
            self.close_connection = True
            return
        drop = owner.drop_after.pop(self.path, None)
        self.wfile.write(body if drop is None else body[:drop])
        if drop is not None:
            self.close_connection = True


class FileServer:
    def __init__(self, host="127.0.0.1"):
        self.files = {}  # served path -> content
        self.drop_after = {}  # served path -> bytes sent before the connection drops, once
        self.stall_after = {}  # served path -> bytes sent before the response stalls until close, once
        self.hold = {}  # served path -> threading.Event the response waits for after its headers
        self.no_length = set()  # served paths answered without a Content-Length
        self.content_type = {}  # served path -> its Content-Type (default application/octet-stream)
        self.redirect = {}  # served path -> the address a 302 sends the client to
        self.requests = []  # (served path, Range header)
        self.closing = threading.Event()
        self.host = host
        self.httpd = ThreadingHTTPServer((host, 0), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.owner = self
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    @property
    def base(self):
        return f"http://{self.host}:{self.httpd.server_port}"

    def serve(self, url, content):
        """Serve `content` as the mirror's copy of `url`; returns the path it is served at."""
        path = mirror_path(url)
        self.files[path] = content
        return path

    def requests_for(self, path):
        return [asked for served, asked in self.requests if served == path]

    def close(self):
        self.closing.set()
        for event in self.hold.values():
            event.set()
        self.httpd.shutdown()
        self.httpd.server_close()
