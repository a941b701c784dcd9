"""A tampered artifact is refused before anything in it is loaded: every kind of edit a hostile user can make.

Two levels are tested. A naive edit (a value or path changed in manifest.json) breaks manifest.json.sha256. An edit
that also rewrites the digest file ("re-signed") is still refused when it points outside the artifact, at an
unchecked file or at shards that do not fit; and `--expect-digest` (a digest pinned from a trusted build) refuses
every re-signed artifact.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
from click.testing import CliRunner

from edgellm.artifact import Artifact, ArtifactError, file_table, write_manifest
from edgellm.cli import cli


@pytest.fixture
def art(compiled, tmp_path):
    dst = tmp_path / "art"
    shutil.copytree(compiled("llama", "q0f32"), dst)
    return dst


def _manifest(path):
    return json.loads((path / "manifest.json").read_text())


def _set(manifest, path, value=None, delete=False):
    """manifest[path[0]][path[1]]... = value (or deleted); returns the manifest."""
    d = manifest
    for k in path[:-1]:
        d = d[k]
    if delete:
        del d[path[-1]]
    else:
        d[path[-1]] = value
    return manifest


def _resign(path, manifest, refresh_files=False):
    """What an attacker who can write the folder does: rewrite the manifest and its digest consistently."""
    if refresh_files:
        manifest["files"] = file_table(path)
    write_manifest(path, manifest)


@pytest.mark.parametrize("edit", [
    ("model", "config", "vocab_size"), ("runtime", "context_window"), ("runtime", "max_batch"),
    ("tokenizer", "eos_token_ids"), ("lib",),
])
def test_any_manifest_edit_breaks_the_digest(art, edit):
    m = _manifest(art)
    old = m
    for k in edit:
        old = old[k]
    new = [7] if edit[-1] == "eos_token_ids" else ("lib/x.so" if edit[-1] == "lib" else old * 2)
    (art / "manifest.json").write_text(json.dumps(_set(m, edit, new), indent=1))  # the digest file is left as it was
    with pytest.raises(ArtifactError, match="does not match manifest.json.sha256"):
        Artifact.open(art)


def test_missing_digest_file_refused(art):
    (art / "manifest.json.sha256").unlink()
    with pytest.raises(ArtifactError, match="manifest.json.sha256"):
        Artifact.open(art)


@pytest.mark.parametrize("lib", ["/tmp/evil.so", "../evil.so", "lib/../../evil.so", "./lib/model.so", "lib//model.so",
                                 "lib\\model.so", ""])
def test_lib_path_outside_or_unnormalized_refused(art, lib):
    m = _manifest(art)
    m["lib"] = lib
    _resign(art, m)
    with pytest.raises(ArtifactError, match="not a relative path|not a normalized path|outside"):
        Artifact.open(art)


def test_lib_not_in_file_table_refused(art):
    """A library that was never hashed is never loaded, even inside the artifact."""
    shutil.copy(art / "lib" / "model.so", art / "lib" / "other.so")
    m = _manifest(art)
    m["lib"] = "lib/other.so"
    _resign(art, m)
    with pytest.raises(ArtifactError, match="lib/other.so is not in the manifest's file table"):
        Artifact.open(art)


@pytest.mark.parametrize("rel", ["params/../../somewhere/x", "/etc/passwd", "params/./shard_000.bin"])
def test_file_table_traversal_refused(art, rel):
    m = _manifest(art)
    m["files"][rel] = dict(m["files"]["params/index.json"])
    _resign(art, m)
    with pytest.raises(ArtifactError, match="not a normalized path|not a relative path"):
        Artifact.open(art)


def test_delisted_shard_refused(art):
    _resign(art, _set(_manifest(art), ("files", "params/shard_000.bin"), delete=True))
    with pytest.raises(ArtifactError, match="does not fit the listed shards"):
        Artifact.open(art).param_index()


def test_index_entry_beyond_its_shard_refused(art):
    index = json.loads((art / "params" / "index.json").read_text())
    index["params"][0]["offset"] = 1 << 40
    (art / "params" / "index.json").write_text(json.dumps(index))
    _resign(art, _manifest(art), refresh_files=True)  # hashes agree with the edited index
    with pytest.raises(ArtifactError, match="does not fit the listed shards"):
        Artifact.open(art).param_index()


def test_symlink_out_of_the_artifact_refused(art, tmp_path):
    """A listed file replaced by a symlink to an identical file outside: the hash matches, the path does not."""
    outside = tmp_path / "outside.json"
    shutil.copy(art / "tokenizer" / "tokenizer.json", outside)
    (art / "tokenizer" / "tokenizer.json").unlink()
    os.symlink(outside, art / "tokenizer" / "tokenizer.json")
    with pytest.raises(ArtifactError, match="resolves outside the artifact"):
        Artifact.open(art)


def test_symlinked_params_folder_refused(art, tmp_path):
    shutil.move(art / "params", tmp_path / "params")
    os.symlink(tmp_path / "params", art / "params")
    with pytest.raises(ArtifactError, match="resolves outside the artifact"):
        Artifact.open(art)


def test_unlisted_file_is_never_opened(art):
    """tokenizer_config.json holds the chat template: one dropped from the table must not be read."""
    _resign(art, _set(_manifest(art), ("files", "tokenizer/tokenizer_config.json"), delete=True))
    a = Artifact.open(art)
    assert a.listed("tokenizer/tokenizer_config.json") is None
    with pytest.raises(ArtifactError, match="never checked"):
        a.path("tokenizer/tokenizer_config.json")


def test_pinned_digest_refuses_a_resigned_artifact(art):
    runner = CliRunner()
    good = Artifact.open(art).digest
    r = runner.invoke(cli, ["run", str(art), "hi", "-n", "2", "--no-chat", "--expect-digest", good[:16]])
    assert r.exit_code == 0, r.output
    assert f"root digest {good}" in r.stderr
    m = _manifest(art)
    m["runtime"]["context_window"] = 128  # a plausible edit, consistently re-signed
    _resign(art, m)
    r = runner.invoke(cli, ["run", str(art), "hi", "--expect-digest", good[:16]])
    assert r.exit_code == 1 and "not the expected" in r.stderr and "Traceback" not in r.output
    r = runner.invoke(cli, ["bench", str(art), "-p", "4", "-n", "0", "--reps", "1", "--expect-digest", "abc"])
    assert r.exit_code == 1 and "not the expected" in r.stderr


def test_package_never_writes_outside_its_output(compiled, tmp_path):
    """The issue's case: a file-table entry params/../../../somewhere/x with a matching hash."""
    from edgellm.package import PackageArgs, package_artifact

    art = tmp_path / "art"
    shutil.copytree(compiled("llama", "q0f32"), art)
    evil = "params/../../escaped/x"
    (tmp_path / "payload").write_bytes(b"payload")
    m = _manifest(art)
    m["files"][evil] = file_table(tmp_path, skip=())["payload"]
    _resign(art, m)
    with pytest.raises(ArtifactError, match="not a normalized path"):
        package_artifact(PackageArgs(artifact=art, platform="android", output=tmp_path / "pkg"))
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "pkg").exists()


@pytest.mark.parametrize("path, value", [
    (("runtime", "context_window"), 0), (("runtime", "max_batch"), "8"), (("tokenizer", "eos_token_ids"), ["x"]),
    (("lib",), 5), (("target", "kind"), None), (("model", "config"), []),
])
def test_resigned_nonsense_values_refused_naming_the_field(art, path, value):
    """Even consistently re-signed, a manifest value of the wrong type or range is refused, naming the field."""
    _resign(art, _set(_manifest(art), path, value))
    with pytest.raises(ArtifactError, match=path[-1]):
        Artifact.open(art)
