"""The OCI artifact: reproducible, pinned in istio/, accepted by Istio's fetcher, and
byte-identical after a push to and a pull from a real registry with oras.

Reproducible: test_manifests_pin_the_fresh_build compares this checkout's fresh build (the
oci_build fixture, a clean target directory in a fresh clone) with the digests `make oci`
pinned in another checkout, at another path, on another machine. CI's clone is never where the
pins were made, so a path or machine leaking into the module fails it there. (A second clean
build on the same machine, `scripts/oci.sh reproducible`, proves less and cost make test a
full LTO build; it stays a manual check.)"""

from __future__ import annotations

import gzip
import io
import json
import shutil
import tarfile

import pytest

import bbr_oci
import istio_convert as ic
from conftest import ROOT, doc


def _pins() -> list[bbr_oci.Pins]:
    return [bbr_oci.read_pins(p) for p in bbr_oci.PINNED_FILES]


def test_manifests_pin_the_fresh_build(oci_build):
    """The committed sha256 (manifest digest) and module annotation match a fresh build of the
    current source. If this fails after a change under src/ or Cargo.lock: run `make oci`."""
    problems = bbr_oci.stale_pins(oci_build)
    if problems:
        built_with = {p.built_with for p in _pins()}
        now = bbr_oci.rustc_version()
        hint = ""
        if built_with != {now}:
            hint = f"\n(the pins were made with {sorted(built_with)}, this build with {now}: the module bytes depend on the rustc version)"
        pytest.fail("istio/ is stale, run `make oci`:\n  " + "\n  ".join(problems) + hint, pytrace=False)


def test_packaging_is_deterministic_and_standard(oci_build, tmp_path):
    again = bbr_oci.package(oci_build.module, bbr_oci.crate_version())
    assert again.manifest == oci_build.manifest and again.layer.data == oci_build.layer.data
    # The layer is an ordinary tar.gz with one plain file, plugin.wasm.
    raw = gzip.decompress(oci_build.layer.data)
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        (member,) = tar.getmembers()
        assert (member.name, member.mode, member.mtime, member.uid, member.gid) == ("plugin.wasm", 0o644, 0, 0, 0)
        assert tar.extractfile(member).read() == oci_build.module
    manifest = json.loads(oci_build.manifest)
    assert manifest["mediaType"] == bbr_oci.MANIFEST_MEDIA_TYPE
    assert manifest["config"]["mediaType"] == bbr_oci.CONFIG_MEDIA_TYPE
    assert [l["mediaType"] for l in manifest["layers"]] == [bbr_oci.LAYER_MEDIA_TYPE]
    config = json.loads(oci_build.config.data)
    assert config["rootfs"]["diff_ids"] == ["sha256:" + bbr_oci.sha256_hex(raw)]
    # The OCI image layout that `scripts/oci.sh build` writes holds exactly these blobs.
    layout = ROOT / "target" / "oci" / "image"
    index = json.loads((layout / "index.json").read_text())
    assert index["manifests"][0]["digest"] == "sha256:" + oci_build.manifest_digest
    for digest in (oci_build.manifest_digest, oci_build.layer.digest[7:], oci_build.config.digest[7:]):
        assert bbr_oci.sha256_hex((layout / "blobs" / "sha256" / digest).read_bytes()) == digest


def test_istio_fetcher_accepts_the_image(oci_build):
    blobs = {oci_build.layer.digest: oci_build.layer.data, oci_build.config.digest: oci_build.config.data}
    assert bbr_oci.istio_extract(oci_build.manifest, blobs) == oci_build.module


def test_istio_fetcher_checks_reject_bad_images(oci_build):
    blobs = {oci_build.layer.digest: oci_build.layer.data, oci_build.config.digest: oci_build.config.data}
    m = json.loads(oci_build.manifest)
    m["layers"][0]["mediaType"] = "application/vnd.oci.image.layer.v1.tar"
    with pytest.raises(bbr_oci.NotAcceptedByIstio, match="invalid media type"):
        bbr_oci.istio_extract(bbr_oci.canonical_json(m), blobs)
    wrong_name = bbr_oci.stored_gzip(bbr_oci.deterministic_tar("filter.wasm", oci_build.module))
    m = json.loads(oci_build.manifest)
    m["layers"][0].update(digest="sha256:" + bbr_oci.sha256_hex(wrong_name), size=len(wrong_name))
    with pytest.raises(bbr_oci.NotAcceptedByIstio, match="plugin.wasm not found"):
        bbr_oci.istio_extract(bbr_oci.canonical_json(m), {**blobs, m["layers"][0]["digest"]: wrong_name})
    with pytest.raises(ValueError):
        bbr_oci.package(b"not wasm")


def test_push_then_pull_is_byte_identical(registry, oci_build, tmp_path):
    ref = f"{registry.host}/llm-d/bbr-wasm:{bbr_oci.crate_version()}"
    assert bbr_oci.push(oci_build, ref, insecure=True) == "sha256:" + oci_build.manifest_digest
    pulled = bbr_oci.pull(ref, insecure=True)
    assert pulled.manifest == oci_build.manifest
    assert pulled.manifest_digest == oci_build.manifest_digest
    assert pulled.module == oci_build.module
    # What the istio-agent does with the EnvoyFilter once pulled: `sha256` must equal the
    # image's manifest digest (pkg/wasm/cache.go), then Envoy gets a local file. (Whether the
    # committed sha256 is this build's is test_manifests_pin_the_fresh_build's question.)
    tc = ic.extension_config(doc("EnvoyFilter", "bbr-wasm"))["typed_config"]
    tc["config"]["vm_config"]["code"]["remote"]["sha256"] = oci_build.manifest_digest
    localized = ic.agent_localize(tc, str(tmp_path / "m.wasm"), pulled.manifest_digest)
    assert localized["config"]["vm_config"]["code"] == {"local": {"filename": str(tmp_path / "m.wasm")}}
    # The module's own sha256 is NOT what Istio compares for oci:// (only for http(s)://).
    tc["config"]["vm_config"]["code"]["remote"]["sha256"] = oci_build.module_sha256
    with pytest.raises(ValueError, match="does not match"):
        ic.agent_localize(tc, str(tmp_path / "m.wasm"), pulled.manifest_digest)


def test_oras_generic_pull_reads_it(registry, oci_build, tmp_path):
    """oras' own high-level pull, the way a person would fetch it: oras treats a tar+gzip layer
    as a packed directory and unpacks it, so plugin.wasm lands in the output directory."""
    import oras.client

    ref = f"{registry.host}/llm-d/bbr-wasm:generic"
    bbr_oci.push(oci_build, ref, insecure=True)
    client = oras.client.OrasClient(hostname=registry.host, insecure=True)
    client.pull(target=ref, outdir=str(tmp_path))
    assert (tmp_path / "plugin.wasm").read_bytes() == oci_build.module


def test_a_different_module_fails_the_pinned_checksum(registry, oci_build, tmp_path):
    """Re-pushing the tag with other bytes: the agent's checksum check refuses it."""
    # Still a valid module: a custom section appended at the end.
    other = bbr_oci.package(oci_build.module + b"\x00\x05\x04test", bbr_oci.crate_version())
    ref = f"{registry.host}/llm-d/bbr-wasm:tampered"
    bbr_oci.push(other, ref, insecure=True)
    pulled = bbr_oci.pull(ref, insecure=True)
    assert pulled.module == other.module
    tc = ic.extension_config(doc("EnvoyFilter", "bbr-wasm"))["typed_config"]
    tc["config"]["vm_config"]["code"]["remote"]["sha256"] = oci_build.manifest_digest  # pinned to the real build
    with pytest.raises(ValueError, match="does not match"):
        ic.agent_localize(tc, str(tmp_path / "m.wasm"), pulled.manifest_digest)
    assert bbr_oci.stale_pins(other)


def test_pin_rewrites_only_the_pins(oci_build, tmp_path, monkeypatch):
    """`make oci` on copies of the pinned files: sha256, the annotations and (with a ref) the
    image change; every other byte (comments included) stays; a second run changes nothing."""
    copies = []
    for p in bbr_oci.PINNED_FILES:
        c = tmp_path / p.parent.name / p.name
        c.parent.mkdir()
        shutil.copy(p, c)
        copies.append(c)
    monkeypatch.setattr(bbr_oci, "PINNED_FILES", tuple(copies))
    monkeypatch.setattr(bbr_oci, "ROOT", tmp_path)
    other = bbr_oci.package(oci_build.module + b"\x00\x05\x04test", "9.9.9")
    before = [c.read_text() for c in copies]
    changed = [bbr_oci.rewrite_pins(c, other, "rustc 0.0.0", "ghcr.io/example/bbr-wasm:9.9.9") for c in copies]
    assert changed == [True, True]
    assert bbr_oci.stale_pins(other) == []
    for c, old in zip(copies, before):
        new = c.read_text()
        diff = [(a, b) for a, b in zip(old.splitlines(), new.splitlines()) if a != b]
        assert len(old.splitlines()) == len(new.splitlines())
        assert len(diff) == 4, diff  # sha256, two annotations, the image
        p = bbr_oci.read_pins(c)
        assert (p.sha256, p.module_sha256, p.built_with, p.ref) == (
            other.manifest_digest, other.module_sha256, "rustc 0.0.0", "ghcr.io/example/bbr-wasm:9.9.9"
        )
    assert [bbr_oci.rewrite_pins(c, other, "rustc 0.0.0", "ghcr.io/example/bbr-wasm:9.9.9") for c in copies] == [False, False]


def test_split_ref():
    assert bbr_oci.split_ref("oci://ghcr.io/a/b:1") == ("ghcr.io", "a/b:1")
    assert bbr_oci.split_ref("127.0.0.1:5000/a/b") == ("127.0.0.1:5000", "a/b:latest")
    for bad in ("bbr-wasm:1", "ghcr.io/a/b@sha256:" + "0" * 64):
        with pytest.raises(ValueError):
            bbr_oci.split_ref(bad)
