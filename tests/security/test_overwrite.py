"""`--overwrite` replaces only an edgellm artifact (or package) and never loses user data; failures and SIGTERM
leave nothing half-written; artifacts get the user's umask."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from edgellm.cli import cli


@pytest.fixture
def runner():
    return CliRunner()


def _partials(folder):
    return [p for p in folder.iterdir() if ".partial-" in p.name or ".old-" in p.name]


def _user_folder(path):
    path.mkdir(parents=True)
    (path / "thesis.tex").write_text("years of work")
    return path


def test_overwrite_refuses_a_folder_of_user_files(runner, checkpoints, tmp_path):
    out = _user_folder(tmp_path / "mine")
    r = runner.invoke(cli, ["compile", str(checkpoints["llama"]), "-o", str(out), "--overwrite"])
    assert r.exit_code == 1 and "not an edgellm artifact" in r.stderr
    assert (out / "thesis.tex").read_text() == "years of work"


def test_overwrite_refuses_the_current_directory_and_its_parents(runner, checkpoints, tmp_path, monkeypatch):
    cwd = _user_folder(tmp_path / "work" / "here")
    monkeypatch.chdir(cwd)
    for out in (".", str(cwd), "..", str(tmp_path)):
        r = runner.invoke(cli, ["compile", str(checkpoints["llama"]), "-o", out, "--overwrite"])
        assert r.exit_code == 1 and "current directory" in r.stderr, (out, r.stderr)
    assert (cwd / "thesis.tex").exists()


def test_overwrite_refuses_the_model_being_read(runner, checkpoints, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(checkpoints["llama"], ckpt)
    before = sorted(p.name for p in ckpt.iterdir())
    for out in (ckpt, tmp_path):  # the checkpoint itself, and a folder holding it
        r = runner.invoke(cli, ["compile", str(ckpt), "-o", str(out), "--overwrite"])
        assert r.exit_code == 1 and "model being read" in r.stderr, r.stderr
    assert sorted(p.name for p in ckpt.iterdir()) == before


def test_overwrite_refuses_a_file_and_a_symlink(runner, checkpoints, tmp_path, compiled):
    f = tmp_path / "notes.txt"
    f.write_text("keep")
    r = runner.invoke(cli, ["compile", str(checkpoints["llama"]), "-o", str(f), "--overwrite"])
    assert r.exit_code == 1 and "not a folder" in r.stderr and f.read_text() == "keep"
    link = tmp_path / "link"
    os.symlink(compiled("llama", "q0f32"), link)
    r = runner.invoke(cli, ["compile", str(checkpoints["llama"]), "-o", str(link), "--overwrite"])
    assert r.exit_code == 1 and "symlink" in r.stderr


def test_existing_output_refused_before_the_model_is_read(runner, checkpoints, tmp_path, monkeypatch):
    import edgellm.compile as comp

    def never(*a, **k):
        raise AssertionError("the model was opened before the output check")

    monkeypatch.setattr(comp, "open_model", never)
    out = _user_folder(tmp_path / "exists")
    r = runner.invoke(cli, ["compile", str(checkpoints["llama"]), "-o", str(out)])
    assert r.exit_code == 1 and "already exists" in r.stderr and "--overwrite" in r.stderr


def test_overwrite_replaces_an_artifact_with_the_umask_mode(runner, checkpoints, tmp_path):
    out = tmp_path / "art"
    old = os.umask(0o022)
    try:
        for _ in range(2):  # create, then replace the artifact of ours
            r = runner.invoke(cli, ["compile", str(checkpoints["llama"]), "-q", "q0f32", "-o", str(out),
                                    "--overwrite", "--context-window", "64"])
            assert r.exit_code == 0, r.output
    finally:
        os.umask(old)
    assert (out / "manifest.json").exists() and (out.stat().st_mode & 0o777) == 0o755
    assert _partials(tmp_path) == []


def test_sigterm_during_compile_leaves_no_partial_folder(checkpoints, tmp_path):
    out = tmp_path / "art"
    proc = subprocess.Popen([sys.executable, "-m", "edgellm.cli", "compile", str(checkpoints["llama"]), "-q", "q0f32",
                             "-o", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not _partials(tmp_path) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _partials(tmp_path), "the compile never started writing"
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert _partials(tmp_path) == [] and not out.exists()


def test_package_overwrite_refuses_user_files(runner, tmp_path, compiled):
    out = _user_folder(tmp_path / "pkg")
    from edgellm.package import PackageArgs, package_artifact

    from edgellm.artifact import ArtifactError

    with pytest.raises(ArtifactError, match="not an edgellm package"):
        package_artifact(PackageArgs(artifact=compiled("llama", "q0f32"), platform="android", output=out,
                                     overwrite=True))
    assert (out / "thesis.tex").exists()
