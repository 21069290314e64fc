"""Files from the internet (backbone releases, data set archives): fetched once, completely, or not at all.

A download goes to a hidden file beside its target, `.NAME.partial`, and is renamed to NAME only once
every byte the server declared has arrived, so no step ever reads a truncated file. An interrupted
download (a dropped connection, Ctrl-C, a killed process) leaves the partial file, and the next call
resumes it with an HTTP Range request (If-Range guards against a file changed on the server meanwhile;
a server that ignores ranges sends it again from the start). The size is checked against the
server's Content-Length or Content-Range total, and against the expected size when one is known.

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
    return Downloaded(target, entry.get("url"), size, entry.get("sha256"))


def download(url, target, size=None, progress=True, timeout=60, instead=None):
    """Fetch `url` into the file `target` (see the module's docstring) and return its Downloaded.

    `size`: the expected size in bytes, when known; a server offering another size is refused.
    `instead`: what the error tells a user to do by hand (default: save the file as `target`).
    Every failure (no network, an HTTP error, a wrong or incomplete size) is a DownloadError whose one
    line names the address, the file and where it goes; an incomplete download is kept to resume.
    """
    target = Path(target)
    with exclusive(_sibling(target, "lock"), f"the download of {target.name}",
                   waiting=f"[download] waiting for another process fetching {target.name}"):
        if target.is_file():  # fetched by another process while this one waited, or placed by hand
            return downloaded(target) or Downloaded(target, None, target.stat().st_size,
                                                    f"sha256:{_sha256(target).hexdigest()}")
        source = mirrored(url)
        partial = _sibling(target, "partial")
        try:
            digest, total = _fetch(source, partial, size, progress, timeout, target.name)
        except Exception as err:
            reason = _reason(err)
            if reason is None:
                raise
            done = partial.stat().st_size if partial.exists() else 0
            kept = f"; the {_megabytes(done)} received are kept and the same command resumes" if done else ""
            name = Path(urllib.parse.urlsplit(url).path).name
            raise DownloadError(f"cannot download {source} ({reason}{kept}): fetch {name} from there or a copy "
                                f"of it and {instead or f'save it as {target}'}") from None
        os.replace(partial, target)
        _sibling(target, "partial.json").unlink(missing_ok=True)
        result = Downloaded(target, source, total, f"sha256:{digest.hexdigest()}")
        save_text(json.dumps({**result.record(), "original_url": url, "downloaded": now()}), downloaded_note(target))
        return result


class _Refused(Exception):
    """The server's answer cannot be the file asked for (another size): nothing of it is kept."""


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
    """Bring `partial` to the complete file at `source`; return (its sha256 hasher, its size)."""
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
            return _sha256(partial), have
        partial.unlink()
        return _fetch(source, partial, size, progress, timeout, label)
    with response:
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
        save_text(json.dumps({"url": source, "etag": response.headers.get("ETag"),
                              "last_modified": response.headers.get("Last-Modified")}), meta_path)
        digest = _sha256(partial) if have else hashlib.sha256()
        with open(partial, "ab" if have else "wb") as f, tqdm(
                total=expected, initial=have, unit="B", unit_scale=True, unit_divisor=1024,
                desc=f"[download] {label}", disable=not progress) as bar:
            while chunk := response.read(_CHUNK):
                f.write(chunk)
                digest.update(chunk)
                have += len(chunk)
                bar.update(len(chunk))
    if expected is not None and have > expected:
        partial.unlink()
        raise _Refused(f"the server sent more than the {expected} bytes of the file")
    if expected is not None and have < expected:
        raise ConnectionError(f"the connection closed after {_megabytes(have)} of {_megabytes(expected)}")
    return digest, have
