"""`loraforge verify --remote`: the published release against the lock, over a real HTTP hub on 127.0.0.1.

The release is published with `loraforge publish` (tests/test_publish.py
covers that); tampered copies are made as other repositories of the same hub
holding the published files with one changed.
"""

from __future__ import annotations

import json

from test_publish import REPO, _invoke, _lock, _publish, built, hub, project  # noqa: F401  (fixtures)


def _verify(project, *extra):
    return _invoke("verify", project / "recipe.yaml", *extra)


def _published_commit(project) -> str:
    return _lock(project)["published"]["pack"][f"hf://{REPO}@main"]["commit"]


def test_the_published_commit_is_the_release_the_lock_records(project, hub):
    assert _publish(project).exit_code == 0
    commit = _published_commit(project)
    result = _verify(project, "--remote", f"hf://{REPO}@{commit}", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["ok"] and report["remote"] == f"hf://{REPO}@{commit}" and report["release"] == "pack"
    files = {f["file"] for f in report["files"]}
    assert files == set(hub.files_at(REPO, commit)) - {".gitattributes"}
    assert report["unlisted"] == [".gitattributes"]
    # A branch name works too, and names the commit it checked.
    by_branch = _verify(project, "pack", "--remote", f"hf://{REPO}")
    assert by_branch.exit_code == 0, by_branch.output
    assert f"OK: hf://{REPO}@{commit} holds release 'pack'" in by_branch.output


def test_a_changed_file_on_the_remote_is_named(project, hub):
    assert _publish(project).exit_code == 0
    files = hub.files_at(REPO, _published_commit(project))
    files.pop(".gitattributes")
    files["README.md"] = files["README.md"] + b"\nedited on the Hub\n"
    hub.create_repo("acme/edited", files=files)
    result = _verify(project, "--remote", "hf://acme/edited")
    assert result.exit_code == 1, result.output
    lines = result.output.splitlines()
    assert any(line.startswith("DIFFERS") and "README.md" in line and "the manifest lists" in line for line in lines), lines
    assert sum(line.startswith("identical") for line in lines) == len(files) - 1
    assert lines[-1].startswith("FAILED: 1 of")


def test_another_build_of_the_release_is_caught_by_its_manifest(project, hub):
    assert _publish(project).exit_code == 0
    files = hub.files_at(REPO, _published_commit(project))
    files.pop(".gitattributes")
    files["manifest.json"] = files["manifest.json"].replace(b'"release": "pack"', b'"release": "pack2"')
    hub.create_repo("acme/other", files=files)
    result = _verify(project, "--remote", "hf://acme/other", "--json")
    assert result.exit_code == 1, result.output
    (verdict,) = json.loads(result.output)["files"]
    assert verdict["file"] == "manifest.json" and "the lock records" in verdict["reason"]


def test_a_missing_repository_or_a_bad_address_is_one_paragraph(project, hub):
    for remote, fragment in (("hf://acme/nothing-here", "hf://acme/nothing-here"), ("s3://bucket/x", "hf://ORG/REPO@REVISION")):
        result = _verify(project, "--remote", remote)
        assert result.exit_code == 2, result.output
        assert "Traceback" not in result.output and fragment in result.output
