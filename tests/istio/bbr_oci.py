"""The bbr-wasm OCI artifact: reproducible packaging, push and pull with oras, and the pins
in istio/.

Used by scripts/oci.sh (`make oci`) and by the tests in this folder. Run as a program:

    python tests/istio/bbr_oci.py package MODULE OUTDIR   # OCI image layout + summary JSON
    python tests/istio/bbr_oci.py pin MODULE [--ref REF]  # rewrite the digests (and ref) in istio/
    python tests/istio/bbr_oci.py check MODULE            # exit 1 if istio/ is stale
    python tests/istio/bbr_oci.py push MODULE REF [--insecure]
    python tests/istio/bbr_oci.py pull REF OUTFILE [--insecure]

Format: the "compat" variant of the Wasm image format, the one Istio's fetcher tries first
(istio/istio pkg/wasm/imagefetcher.go, extractOCIStandardImage):

  manifest  application/vnd.oci.image.manifest.v1+json
  config    application/vnd.oci.image.config.v1+json   (a minimal image config, os wasip1)
  layers    exactly one, application/vnd.oci.image.layer.v1.tar+gzip, a tar holding one
            file, plugin.wasm, the module

The bytes are a function of the module alone: the tar entry has mtime 0, uid/gid 0 and mode
0644; the gzip stream has mtime 0 and uses stored (uncompressed) deflate blocks, so no zlib
version or implementation can change them; the JSON documents are written with sorted keys
and no spaces, and pushed byte for byte. So the manifest digest is known before any push.

Which sha256 Istio checks: for an oci:// URL, the `sha256` of a WasmPlugin (or the
`remote.sha256` of a Wasm filter that the istio-agent fetches) is compared with the digest
of the image MANIFEST (pkg/wasm/cache.go: `binaryFetcher, dChecksum, err =
fetcher.PrepareFetch(...)`, where PrepareFetch returns `img.Digest()`), not with the sha256
of the module bytes; the module's own sha256 is what Istio checks for http(s):// URLs only.
The manifests therefore carry the manifest digest in `sha256`, and the module's sha256 in
the annotation `bbr-wasm/module-sha256` for people and for the staleness test.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import re
import struct
import sys
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[2]
ISTIO_DIR = ROOT / "istio"

MANIFEST_MEDIA_TYPE = "application/vnd.oci.image.manifest.v1+json"
CONFIG_MEDIA_TYPE = "application/vnd.oci.image.config.v1+json"
LAYER_MEDIA_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"
# The file name Istio's compat-variant extractor looks for (extractWasmPluginBinary).
MODULE_NAME_IN_LAYER = "plugin.wasm"
LAYER_TITLE = "plugin.wasm.tar.gz"
WASM_MAGIC = b"\x00asm"

# Where each pin lives. Every file listed must hold exactly one of each pattern.
PINNED_FILES = (
    ISTIO_DIR / "bbr" / "envoyfilter.yaml",
    ISTIO_DIR / "wasmplugin" / "wasmplugin.yaml",
)
ANNOTATION_MODULE_SHA = "bbr-wasm/module-sha256"
ANNOTATION_BUILT_WITH = "bbr-wasm/built-with"

_SHA_RE = re.compile(r"^(?P<indent>\s*)sha256: (?P<value>\S+)(?P<rest>\s*(#.*)?)$", re.M)
_REF_RE = re.compile(r"^(?P<indent>\s*)(?P<key>url|uri): oci://(?P<value>\S+)(?P<rest>\s*(#.*)?)$", re.M)
_ANN_SHA_RE = re.compile(
    r"^(?P<indent>\s*)" + re.escape(ANNOTATION_MODULE_SHA) + r": \"?(?P<value>[^\"\s]*)\"?(?P<rest>\s*)$", re.M
)
_ANN_BUILT_RE = re.compile(
    r"^(?P<indent>\s*)" + re.escape(ANNOTATION_BUILT_WITH) + r": \"?(?P<value>[^\"\n]*)\"?(?P<rest>\s*)$", re.M
)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def canonical_json(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


# --------------------------------------------------------------------------------------
# Deterministic packaging
# --------------------------------------------------------------------------------------


def deterministic_tar(name: str, data: bytes) -> bytes:
    """A ustar archive with one regular file; no timestamps, owners or pax headers."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mode = 0o644
        info.mtime = 0
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        info.type = tarfile.REGTYPE
        tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def stored_gzip(data: bytes) -> bytes:
    """RFC 1952 gzip with RFC 1951 stored blocks: byte-identical everywhere.

    Header: magic, CM=8 (deflate), no flags, MTIME=0, XFL=0, OS=255 (unknown). Any gzip
    reader (Go's compress/gzip in Istio, Python's gzip, GNU gzip) reads it.
    """
    out = bytearray(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff")
    max_block = 0xFFFF
    offset = 0
    while True:
        chunk = data[offset : offset + max_block]
        offset += len(chunk)
        final = offset >= len(data)
        out.append(0x01 if final else 0x00)  # BFINAL, BTYPE=00 (stored); rest of the byte is padding
        out += struct.pack("<HH", len(chunk), len(chunk) ^ 0xFFFF)
        out += chunk
        if final:
            break
    out += struct.pack("<II", zlib.crc32(data) & 0xFFFFFFFF, len(data) & 0xFFFFFFFF)
    return bytes(out)


@dataclass
class Blob:
    media_type: str
    data: bytes
    annotations: dict = field(default_factory=dict)

    @property
    def digest(self) -> str:
        return "sha256:" + sha256_hex(self.data)

    def descriptor(self) -> dict:
        d = {"mediaType": self.media_type, "digest": self.digest, "size": len(self.data)}
        if self.annotations:
            d["annotations"] = dict(self.annotations)
        return d


@dataclass
class Artifact:
    module: bytes
    layer: Blob
    config: Blob
    manifest: bytes  # the exact bytes pushed

    @property
    def module_sha256(self) -> str:
        return sha256_hex(self.module)

    @property
    def manifest_digest(self) -> str:
        """Hex, as Istio's `sha256` field wants it (no "sha256:" prefix)."""
        return sha256_hex(self.manifest)

    def summary(self) -> dict:
        return {
            "module_sha256": self.module_sha256,
            "module_size": len(self.module),
            "manifest_digest": "sha256:" + self.manifest_digest,
            "manifest_size": len(self.manifest),
            "config_digest": self.config.digest,
            "layer_digest": self.layer.digest,
            "layer_size": len(self.layer.data),
            "istio_sha256": self.manifest_digest,
        }


def package(module: bytes, version: str = "") -> Artifact:
    if module[:4] != WASM_MAGIC:
        raise ValueError("not a WebAssembly module (no \\0asm magic)")
    tar = deterministic_tar(MODULE_NAME_IN_LAYER, module)
    layer = Blob(LAYER_MEDIA_TYPE, stored_gzip(tar), {"org.opencontainers.image.title": LAYER_TITLE})
    config = Blob(
        CONFIG_MEDIA_TYPE,
        canonical_json(
            {
                "architecture": "wasm",
                "os": "wasip1",
                "config": {},
                "rootfs": {"type": "layers", "diff_ids": ["sha256:" + sha256_hex(tar)]},
            }
        ),
    )
    annotations = {
        "org.opencontainers.image.title": "bbr-wasm",
        ANNOTATION_MODULE_SHA: sha256_hex(module),
    }
    if version:
        annotations["org.opencontainers.image.version"] = version
    manifest = {
        "schemaVersion": 2,
        "mediaType": MANIFEST_MEDIA_TYPE,
        "config": config.descriptor(),
        "layers": [layer.descriptor()],
        "annotations": annotations,
    }
    return Artifact(module=module, layer=layer, config=config, manifest=canonical_json(manifest))


def crate_version() -> str:
    m = re.search(r'^version\s*=\s*"([^"]+)"', (ROOT / "Cargo.toml").read_text(), re.M)
    return m.group(1) if m else ""


def write_layout(art: Artifact, outdir: Path, tag: str) -> None:
    """An OCI image layout (oci-layout, index.json, blobs/sha256/*): `skopeo copy
    --preserve-digests oci:DIR:TAG docker://...` or `oras cp --from-oci-layout` can push it."""
    blobs = outdir / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    for data in (art.layer.data, art.config.data, art.manifest):
        (blobs / sha256_hex(data)).write_bytes(data)
    (outdir / "oci-layout").write_bytes(canonical_json({"imageLayoutVersion": "1.0.0"}))
    index = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {
                "mediaType": MANIFEST_MEDIA_TYPE,
                "digest": "sha256:" + art.manifest_digest,
                "size": len(art.manifest),
                "annotations": {"org.opencontainers.image.ref.name": tag},
            }
        ],
    }
    (outdir / "index.json").write_bytes(canonical_json(index))


# --------------------------------------------------------------------------------------
# What Istio's fetcher does with an image (mirrors pkg/wasm/imagefetcher.go)
# --------------------------------------------------------------------------------------


class NotAcceptedByIstio(ValueError):
    pass


def istio_extract(manifest_bytes: bytes, blobs: dict[str, bytes]) -> bytes:
    """Reproduces the checks of Istio's ImageFetcher on an image: Docker schema 2 manifests
    go to extractDockerImage; otherwise the compat variant (last layer
    application/vnd.oci.image.layer.v1.tar+gzip, a file named plugin.wasm inside); then the
    oci variant (exactly two layers, one application/vnd.module.wasm.content.layer.v1+wasm).
    Then cache.go's isValidWasmBinary. Every blob is checked against its digest, as
    go-containerregistry does. Returns the module bytes."""
    import gzip

    manifest = json.loads(manifest_bytes)
    for desc in [manifest["config"], *manifest["layers"]]:
        data = blobs.get(desc["digest"])
        if data is None:
            raise NotAcceptedByIstio(f"blob {desc['digest']} missing")
        if "sha256:" + sha256_hex(data) != desc["digest"] or len(data) != desc["size"]:
            raise NotAcceptedByIstio(f"blob {desc['digest']} does not match its descriptor")
    layers = manifest["layers"]
    if not layers:
        raise NotAcceptedByIstio("number of layers must be greater than zero")
    docker = manifest.get("mediaType") == "application/vnd.docker.distribution.manifest.v2+json"
    want = "application/vnd.docker.image.rootfs.diff.tar.gzip" if docker else LAYER_MEDIA_TYPE
    last = layers[-1]
    if last["mediaType"] != want:
        raise NotAcceptedByIstio(f"invalid media type {last['mediaType']} (expect {want})")
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(blobs[last["digest"]])), mode="r:") as tar:
        for member in tar:
            if os.path.basename(member.name) == MODULE_NAME_IN_LAYER:
                f = tar.extractfile(member)
                module = f.read() if f else b""
                break
        else:
            raise NotAcceptedByIstio(f"{MODULE_NAME_IN_LAYER} not found in the archive")
    if len(module) < 8 or module[:4] != WASM_MAGIC:
        raise NotAcceptedByIstio("fetched Wasm binary is invalid")
    return module


# --------------------------------------------------------------------------------------
# Registry: push and pull with oras-py
# --------------------------------------------------------------------------------------


def split_ref(ref: str) -> tuple[str, str]:
    """"host[:port]/repo[:tag]" (an optional oci:// prefix) -> (host, "repo:tag")."""
    ref = ref.removeprefix("oci://")
    host, _, rest = ref.partition("/")
    if not rest or ("." not in host and ":" not in host and host != "localhost"):
        raise ValueError(f"{ref!r}: give the registry host too, e.g. ghcr.io/you/bbr-wasm:0.1.0")
    if "@" in rest:
        raise ValueError(f"{ref!r}: push to a tag; the digest is computed")
    if ":" not in rest.rsplit("/", 1)[-1]:
        rest += ":latest"
    return host, rest


def _registry(host: str, insecure: bool):
    import oras.provider

    reg = oras.provider.Registry(hostname=host, insecure=insecure)
    user, password = os.environ.get("OCI_USERNAME"), os.environ.get("OCI_PASSWORD")
    if user and password:
        reg.auth.set_basic_auth(user, password)
    return reg


def push(art: Artifact, ref: str, insecure: bool = False) -> str:
    """Pushes the blobs and then the manifest bytes. Returns the registry's digest."""
    import tempfile

    import jsonschema
    import oras.schemas

    host, name = split_ref(ref)
    reg = _registry(host, insecure)
    container = reg.get_container(name)
    reg.auth.load_configs(container)  # ~/.docker/config.json credentials, if any
    with tempfile.TemporaryDirectory() as tmp:
        for blob in (art.layer, art.config):
            path = Path(tmp) / blob.digest.replace(":", "_")
            path.write_bytes(blob.data)
            resp = reg.upload_blob(str(path), container, blob.descriptor())
            if resp.status_code not in (200, 201, 202):
                raise RuntimeError(f"blob upload {blob.digest}: HTTP {resp.status_code} {resp.text[:300]}")
    manifest = json.loads(art.manifest)
    jsonschema.validate(manifest, schema=oras.schemas.manifest)
    # oras' upload_manifest would re-serialize the manifest with requests' JSON encoder; the
    # digest Istio checks is that of the exact bytes, so they are sent as they are.
    resp = reg.do_request(
        f"{reg.prefix}://{container.manifest_url()}",
        "PUT",
        data=art.manifest,
        headers={"Content-Type": MANIFEST_MEDIA_TYPE},
    )
    if resp.status_code not in (200, 201, 202):
        raise RuntimeError(f"manifest upload: HTTP {resp.status_code} {resp.text[:300]}")
    got = resp.headers.get("Docker-Content-Digest", "")
    want = "sha256:" + art.manifest_digest
    if got and got != want:
        raise RuntimeError(f"registry stored the manifest as {got}, expected {want}")
    return want


@dataclass
class Pulled:
    manifest: bytes
    manifest_digest: str  # hex
    blobs: dict
    module: bytes


def pull(ref: str, insecure: bool = False) -> Pulled:
    """Fetches the manifest and its blobs with oras, verifies every digest, and extracts the
    module the way Istio's fetcher does."""
    import tempfile

    host, name = split_ref(ref)
    reg = _registry(host, insecure)
    container = reg.get_container(name)
    reg.auth.load_configs(container)
    resp = reg.do_request(
        f"{reg.prefix}://{container.manifest_url()}",
        "GET",
        headers={"Accept": MANIFEST_MEDIA_TYPE},
    )
    if resp.status_code != 200:
        raise RuntimeError(f"manifest fetch: HTTP {resp.status_code} {resp.text[:300]}")
    manifest_bytes = resp.content
    digest = sha256_hex(manifest_bytes)
    header = resp.headers.get("Docker-Content-Digest", "")
    if header and header != "sha256:" + digest:
        raise RuntimeError(f"manifest digest header {header} does not match its bytes (sha256:{digest})")
    manifest = json.loads(manifest_bytes)
    blobs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for desc in [manifest["config"], *manifest["layers"]]:
            out = Path(tmp) / desc["digest"].replace(":", "_")
            reg.download_blob(container, desc["digest"], str(out))
            blobs[desc["digest"]] = out.read_bytes()
    module = istio_extract(manifest_bytes, blobs)
    return Pulled(manifest=manifest_bytes, manifest_digest=digest, blobs=blobs, module=module)


# --------------------------------------------------------------------------------------
# The pins in istio/
# --------------------------------------------------------------------------------------


@dataclass
class Pins:
    path: Path
    ref: str
    sha256: str
    module_sha256: str
    built_with: str


def _one(rx: re.Pattern, text: str, path: Path, what: str) -> re.Match:
    found = list(rx.finditer(text))
    if len(found) != 1:
        raise ValueError(f"{path}: expected exactly one {what} line, found {len(found)}")
    return found[0]


def read_pins(path: Path) -> Pins:
    text = path.read_text()
    return Pins(
        path=path,
        ref=_one(_REF_RE, text, path, "oci:// url/uri").group("value"),
        sha256=_one(_SHA_RE, text, path, "sha256").group("value"),
        module_sha256=_one(_ANN_SHA_RE, text, path, ANNOTATION_MODULE_SHA).group("value"),
        built_with=_one(_ANN_BUILT_RE, text, path, ANNOTATION_BUILT_WITH).group("value"),
    )


def _sub_one(rx: re.Pattern, text: str, path: Path, what: str, value: str, fmt: str) -> str:
    m = _one(rx, text, path, what)
    line = fmt.format(indent=m.group("indent"), key=m.groupdict().get("key") or "", value=value)
    return text[: m.start()] + line + m.group("rest") + text[m.end() :]


def rewrite_pins(path: Path, art: Artifact, built_with: str, ref: Optional[str] = None) -> bool:
    """Rewrites the pins of one file in place (comments and layout kept). True if changed."""
    text = path.read_text()
    new = _sub_one(_SHA_RE, text, path, "sha256", art.manifest_digest, "{indent}sha256: {value}")
    new = _sub_one(_ANN_SHA_RE, new, path, ANNOTATION_MODULE_SHA, art.module_sha256, '{indent}' + ANNOTATION_MODULE_SHA + ': "{value}"')
    new = _sub_one(_ANN_BUILT_RE, new, path, ANNOTATION_BUILT_WITH, built_with, '{indent}' + ANNOTATION_BUILT_WITH + ': "{value}"')
    if ref:
        ref = ref.removeprefix("oci://")
        new = _sub_one(_REF_RE, new, path, "oci:// url/uri", ref, "{indent}{key}: oci://{value}")
    if new != text:
        path.write_text(new)
        return True
    return False


def stale_pins(art: Artifact) -> list[str]:
    """What in istio/ does not match this artifact (empty when up to date)."""
    problems = []
    refs = set()
    for path in PINNED_FILES:
        p = read_pins(path)
        refs.add(p.ref)
        rel = path.relative_to(ROOT)
        if p.sha256 != art.manifest_digest:
            problems.append(f"{rel}: sha256 {p.sha256} != manifest digest {art.manifest_digest} of the fresh build")
        if p.module_sha256 != art.module_sha256:
            problems.append(f"{rel}: {ANNOTATION_MODULE_SHA} {p.module_sha256} != {art.module_sha256} (fresh module)")
    if len(refs) != 1:
        problems.append(f"the pinned files name different images: {sorted(refs)}")
    return problems


def rustc_version() -> str:
    import subprocess

    try:
        out = subprocess.run(["rustc", "--version"], capture_output=True, text=True, timeout=30, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# --------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------


def _load(module_path: str) -> Artifact:
    return package(Path(module_path).read_bytes(), crate_version())


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="bbr_oci.py", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("package", help="write an OCI image layout and print the digests")
    p.add_argument("module")
    p.add_argument("outdir")
    p.add_argument("--tag", default="")
    p = sub.add_parser("pin", help="rewrite sha256 (and with --ref the image) in istio/")
    p.add_argument("module")
    p.add_argument("--ref", default=None)
    p.add_argument("--built-with", default=None)
    p = sub.add_parser("check", help="fail if istio/ does not pin this module")
    p.add_argument("module")
    p = sub.add_parser("push", help="push to REF with oras and verify by pulling it back")
    p.add_argument("module")
    p.add_argument("ref")
    p.add_argument("--insecure", action="store_true", help="plain HTTP (a local registry)")
    p = sub.add_parser("pull", help="pull REF with oras, verify, write the module")
    p.add_argument("ref")
    p.add_argument("outfile")
    p.add_argument("--insecure", action="store_true")
    args = ap.parse_args(argv)

    if args.cmd == "package":
        art = _load(args.module)
        write_layout(art, Path(args.outdir), args.tag or crate_version() or "latest")
        print(json.dumps(art.summary(), indent=2))
        return 0
    if args.cmd == "pin":
        art = _load(args.module)
        built_with = args.built_with or rustc_version()
        changed = [str(p.relative_to(ROOT)) for p in PINNED_FILES if rewrite_pins(p, art, built_with, args.ref)]
        problems = stale_pins(art)
        if problems:
            print("\n".join(problems), file=sys.stderr)
            return 1
        print(f"sha256 (manifest digest): {art.manifest_digest}")
        print(f"module sha256:            {art.module_sha256}")
        print("updated: " + (", ".join(changed) if changed else "nothing (already up to date)"))
        return 0
    if args.cmd == "check":
        problems = stale_pins(_load(args.module))
        if problems:
            print("istio/ is stale; run `make oci`:\n  " + "\n  ".join(problems), file=sys.stderr)
            return 1
        print("istio/ pins the current module")
        return 0
    if args.cmd == "push":
        art = _load(args.module)
        digest = push(art, args.ref, insecure=args.insecure)
        back = pull(args.ref, insecure=args.insecure)
        if back.module != art.module or back.manifest_digest != art.manifest_digest:
            print("pulled artifact differs from the pushed one", file=sys.stderr)
            return 1
        print(f"pushed {args.ref} {digest}; pulled back byte-identical ({len(back.module)} bytes)")
        return 0
    if args.cmd == "pull":
        back = pull(args.ref, insecure=args.insecure)
        Path(args.outfile).write_bytes(back.module)
        print(json.dumps({"manifest_digest": "sha256:" + back.manifest_digest, "module_sha256": sha256_hex(back.module)}))
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
