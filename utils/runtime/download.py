"""Files from the internet (backbone releases, data set archives): fetched once, completely, or not at all.

A download goes to a hidden file beside its target, `.NAME.partial`, and is renamed to NAME only once
it is complete and valid, so no step ever reads a truncated file or a web page:
- complete: every byte of a declared size has arrived: the server's Content-Length or Content-Range
  total, checked against the size the project knows, when it knows one. An answer declaring no size at
  all (and no size known) is refused before a byte is written: a cut body could not be told from a
  whole one, and the releases publish no checksum to tell it by.
- not a web page: an answer of Content-Type text/html, or whose body starts as an HTML page does
  (`<!DOCTYPE html`, `<html`), is refused and nothing of it kept: a sign-in, quota or error page
  answered with status 200.
- valid for its kind: the caller's `check` (a torch file the safe loader reads, an archive whose index
  and CRCs check) passes; a body that fails it is deleted.
An interrupted download (a dropped connection, a stalled one past `timeout` seconds, Ctrl-C, a killed
process) keeps every byte received in the partial file, and the next call resumes it with an HTTP
Range request (If-Range guards against a file changed on the server meanwhile; a server that ignores
ranges sends it again from the start).

The download's record, `.NAME.download.json`, names the address the bytes came from (after
redirects), the size, the sha256 and whether the body passed its check: it is how a later run tells a
file this project downloaded (a damaged one is moved aside, `set_aside`, and fetched again) from one a
user placed (named in the error, never touched).

Several processes asking for the same file (the processes of one run) take an exclusive lock on
`.NAME.lock` beside it: one downloads, the others wait and then use its file. The lock is fcntl's:
it holds between processes of one machine (on a network file system, as far as its locking goes).

`CAUSE_DOWNLOAD_MIRROR=BASE` fetches every file from BASE/HOST/PATH instead of its original address
(https://HOST/PATH): the tree `wget -x URL` writes, served by any HTTP server (`python -m http.server`),
for machines that reach only a local mirror. urllib only; nothing here runs what it downloads.
"""
import hashlib
import http.client
import json
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from errors import UserError
from utils.runtime.io import save_text
from utils.runtime.locks import exclusive
from utils.runtime.records import now

MIRROR_VARIABLE = "CAUSE_DOWNLOAD_MIRROR"
_CHUNK = 1 << 20
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+)")
_UNSATISFIED_RANGE = re.compile(r"bytes \*/(\d+)")


class DownloadError(UserError):
    """A file could not be downloaded: the message names its address, its name and where to put it."""


@dataclass(frozen=True)
class Downloaded:
    """A complete file and where it came from (url None: it was placed there by hand)."""
    path: Path
    url: str | None
    size: int
    sha256: str  # "sha256:<hex>", the form of the records' fingerprints
    checked: bool = False  # the download passed the caller's check of its kind

    def record(self):
        return {"url": self.url, "size": self.size, "sha256": self.sha256}


def mirrored(url):
    """The address `url` is fetched from: itself, or BASE/HOST/PATH under $CAUSE_DOWNLOAD_MIRROR."""
    base = os.environ.get(MIRROR_VARIABLE, "").strip()
    if not base:
        return url
    parts = urllib.parse.urlsplit(url)
    return f"{base.rstrip('/')}/{parts.netloc}{parts.path}"


def _sibling(target, kind):
    return target.with_name(f".{target.name}.{kind}")


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest


def _megabytes(count):
    return f"{count / 1e6:.1f} MB"


def downloaded_note(target):
    """The hidden file beside a downloaded `target` that says where it came from."""
    return _sibling(Path(target), "download.json")


def downloaded(target):
    """What the download that made `target` recorded, or None (no such file, or not downloaded here)."""
    target = Path(target)
    try:
        entry = json.loads(downloaded_note(target).read_text())
        size = target.stat().st_size
    except (OSError, ValueError):
        return None
    if not isinstance(entry, dict) or entry.get("size") != size:
        return None  # the file was replaced since
    return Downloaded(target, entry.get("url"), size, entry.get("sha256"), entry.get("checked") is True)


def set_aside(target):
    """Move a damaged file this project downloaded to `.NAME.damaged` beside it (replacing an older one),
    with its record gone, so the next download fetches it again; returns where it went."""
    target = Path(target)
    aside = _sibling(target, "damaged")
    os.replace(target, aside)
    downloaded_note(target).unlink(missing_ok=True)
    return aside


def download(url, target, size=None, progress=True, timeout=60, instead=None, check=None):
    """Fetch `url` into the file `target` (see the module's docstring) and return its Downloaded.

    `size`: the expected size in bytes, when known; a server offering another size is refused.
    `timeout`: seconds a connection or a read may wait before the download counts as stalled.
    `instead`: what the error tells a user to do by hand (default: save the file as `target`).
    `check`: path -> None, or a few words saying why the complete body is not a file of its kind.
    Every failure (no network, an HTTP error, a wrong or incomplete size, a web page, a body failing
    `check`) is a DownloadError whose one line names the address, the file and where it goes; an
    incomplete download is kept to resume.
    """
    target = Path(target)
    with exclusive(_sibling(target, "lock"), f"the download of {target.name}",
                   waiting=f"[download] waiting for another process fetching {target.name}"):
        if target.is_file():  # fetched by another process while this one waited, or placed by hand
            return downloaded(target) or Downloaded(target, None, target.stat().st_size,
                                                    f"sha256:{_sha256(target).hexdigest()}")
        source = mirrored(url)
        partial = _sibling(target, "partial")
        name = Path(urllib.parse.urlsplit(url).path).name
        by_hand = instead or f"save it as {target}"
        try:
            digest, total, came_from = _fetch(source, partial, size, progress, timeout, target.name)
        except _WebPage as err:
            raise DownloadError(f"cannot download {source}: the server sent a web page ({err}), not {name}; the "
                                f"address may need a sign-in, or a quota was reached: open it in a browser, "
                                f"download {name} there and {by_hand}") from None
        except Exception as err:
            reason = _reason(err)
            if reason is None:
                raise
            done = partial.stat().st_size if partial.exists() else 0
            kept = f"; the {_megabytes(done)} received are kept and the same command resumes" if done else ""
            raise DownloadError(f"cannot download {source} ({reason}{kept}): fetch {name} from there or a copy "
                                f"of it and {by_hand}") from None
        problem = check(partial) if check is not None else None
        if problem is not None:
            partial.unlink()
            _sibling(target, "partial.json").unlink(missing_ok=True)
            raise DownloadError(f"cannot download {source}: the {_megabytes(total)} it sent are not a valid {name} "
                                f"({problem}) and were deleted: fetch {name} from there or a copy of it and "
                                f"{by_hand}")
        os.replace(partial, target)
        _sibling(target, "partial.json").unlink(missing_ok=True)
        result = Downloaded(target, came_from, total, f"sha256:{digest.hexdigest()}", check is not None)
        save_text(json.dumps({**result.record(), "original_url": url, "checked": result.checked,
                              "downloaded": now()}), downloaded_note(target))
        return result


class _Refused(Exception):
    """The server's answer cannot be the file asked for (another size, no size): nothing of it is kept."""


class _WebPage(_Refused):
    """The server answered with a web page (what gave it away): nothing of it is kept."""


_SNIFFED = 256  # bytes of a new body read before any is written: enough to see an HTML page's start


def _web_page(head):
    """Whether a body starting with `head` is an HTML page."""
    start = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    return start.startswith((b"<!doctype html", b"<html"))


def _reason(err):
    """Why a download failed, in a few words; None for an exception that is not a download's failure."""
    if isinstance(err, urllib.error.HTTPError):
        return f"HTTP {err.code} {err.reason}"
    if isinstance(err, urllib.error.URLError):
        return str(err.reason)
    if isinstance(err, (_Refused, OSError, http.client.HTTPException)):
        return str(err) or type(err).__name__
    return None


def _fetch(source, partial, size, progress, timeout, label):
    """Bring `partial` to the complete file at `source`; return (its sha256 hasher, its size, the address
    its bytes came from after redirects)."""
    meta_path = partial.with_name(partial.name + ".json")
    have = partial.stat().st_size if partial.exists() else 0
    try:
        meta = json.loads(meta_path.read_text()) if have else {}
    except (OSError, ValueError):
        meta = {}
    if meta.get("url") != source:
        have = 0  # a partial file of another address (or without its notes) cannot be continued
    headers = {"Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
        validator = meta.get("etag") or meta.get("last_modified")
        if validator:
            headers["If-Range"] = validator
    try:
        response = urllib.request.urlopen(urllib.request.Request(source, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code != 416 or not have:
            raise
        # Nothing after byte `have`: the partial file is complete when the file is exactly that long.
        match = _UNSATISFIED_RANGE.fullmatch(err.headers.get("Content-Range", ""))
        if match and int(match.group(1)) == have and size in (None, have):
            return _sha256(partial), have, err.filename
        partial.unlink()
        return _fetch(source, partial, size, progress, timeout, label)
    with response:
        if "text/html" in response.headers.get("Content-Type", "").lower():
            raise _WebPage("Content-Type text/html")
        if response.status == 206:
            match = _CONTENT_RANGE.fullmatch(response.headers.get("Content-Range", ""))
            if not match or int(match.group(1)) != have:  # not the continuation asked for: start again
                partial.unlink()
                return _fetch(source, partial, size, progress, timeout, label)
            total = int(match.group(3))
        else:
            have = 0  # the server sends the whole file
            length = response.headers.get("Content-Length", "")
            total = int(length) if length.isdigit() else None
        if size is not None and total is not None and total != size:
            partial.unlink(missing_ok=True)
            raise _Refused(f"the server offers {total} bytes, the file has {size}")
        expected = total if total is not None else size
        if expected is None:
            raise _Refused("the server declared no size, so a cut file could not be told from a whole one")
        came_from = response.geturl()
        head = b""
        if not have:  # a new body: its start tells a web page before anything is written
            while len(head) < _SNIFFED and (chunk := response.read1(_SNIFFED - len(head))):
                head += chunk
            if _web_page(head):
                raise _WebPage("an HTML page")
        save_text(json.dumps({"url": source, "etag": response.headers.get("ETag"),
                              "last_modified": response.headers.get("Last-Modified")}), meta_path)
        digest = _sha256(partial) if have else hashlib.sha256()
        with open(partial, "ab" if have else "wb") as f, tqdm(
                total=expected, initial=have, unit="B", unit_scale=True, unit_divisor=1024,
                desc=f"[download] {label}", disable=not progress) as bar:
            # read1: what has arrived is written before the next wait, so a stall loses no byte received.
            chunk = head or response.read1(_CHUNK)
            while chunk:
                f.write(chunk)
                digest.update(chunk)
                have += len(chunk)
                bar.update(len(chunk))
                chunk = response.read1(_CHUNK)
    if have > expected:
        partial.unlink()
        raise _Refused(f"the server sent more than the {expected} bytes of the file")
    if have < expected:
        raise ConnectionError(f"the connection closed after {_megabytes(have)} of {_megabytes(expected)}")
    return digest, have, came_from
