"""Vendor uPlot (the dashboard's charts) from npm's registry into aioqueue/dashboard/static/.

    python scripts/vendor_uplot.py [VERSION]

Fetches the package tarball once from https://registry.npmjs.org, checks it against the
registry's own sha512 integrity, and writes the built browser file (``dist/uPlot.iife.min.js``),
its stylesheet and its licence, plus ``uplot.vendored.json`` recording the version, the tarball
URL and the sha256 of the tarball and of each vendored file. Run it again to upgrade.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import sys
import tarfile
import urllib.request
from pathlib import Path

REGISTRY = "https://registry.npmjs.org/uplot"
STATIC = Path(__file__).resolve().parent.parent / "aioqueue" / "dashboard" / "static"
FILES = {
    "package/dist/uPlot.iife.min.js": "uPlot.iife.min.js",
    "package/dist/uPlot.min.css": "uPlot.min.css",
    "package/LICENSE": "uPlot.LICENSE",
}


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=60) as response:
        return bytes(response.read())


def main(argv: list[str]) -> int:
    version = argv[0] if argv else "latest"
    meta = json.loads(_get(f"{REGISTRY}/{version}"))
    url, integrity = meta["dist"]["tarball"], meta["dist"]["integrity"]
    tarball = _get(url)
    algo, _, digest = integrity.partition("-")
    if algo != "sha512" or base64.b64encode(hashlib.sha512(tarball).digest()).decode() != digest:
        print(f"error: {url} does not match the registry's integrity {integrity}", file=sys.stderr)
        return 1
    record = {
        "package": "uplot",
        "version": meta["version"],
        "tarball": url,
        "tarball_sha256": hashlib.sha256(tarball).hexdigest(),
        "files": {},
    }
    with tarfile.open(fileobj=io.BytesIO(tarball), mode="r:gz") as archive:
        for member, target in FILES.items():
            extracted = archive.extractfile(member)
            if extracted is None:
                raise SystemExit(f"error: {member} missing from {url}")
            data = extracted.read()
            (STATIC / target).write_bytes(data)
            record["files"][target] = hashlib.sha256(data).hexdigest()
    (STATIC / "uplot.vendored.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"vendored uplot {meta['version']} into {STATIC}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
