"""`loraforge publish`: a release bundle to a Hugging Face Hub, against a real HTTP hub on 127.0.0.1.

The hub (loraforge/testing/fake_hub.py) serves the endpoints huggingface_hub
calls (create repo, preupload, LFS batch and upload, commit, tree, resolve);
huggingface_hub itself does the talking, pointed there by HF_ENDPOINT. Xet is
switched off (HF_HUB_DISABLE_XET) because Xet storage is a separate service;
the LFS path is the one the hub's answers select. Tests assert on what the
hub received and holds.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from loraforge.cli import app
from loraforge.errors import BuildError
from loraforge.publish.bundle import read_bundle
from loraforge.recipe.destination import DestinationSyntaxError, parse_destination
from loraforge.testing.fake_hub import FakeHub

runner = CliRunner()
MODELS = Path(__file__).resolve().parents[1] / "recipes" / "models"
TOKEN = "hf_writeTokenForTests0123456789"
READ_TOKEN = "hf_readOnlyTokenForTests0123456"
REPO = "acme/neon-pack"

RECIPE = """\
loraforge: 1
name: neon-pack
title: Neon Pack
description: Two LoRAs merged exactly, and baked into the tiny base.
date: "2026-11-01"
license: creativeml-openrail-m
precision: {save: float16}

inputs:
  base: {source: models/tiny-sd15-base.safetensors}
  neon: {source: models/neon-lora.safetensors}
  noir: {source: models/noir-locon.safetensors}

targets:
  neon-noir-lora:
    kind: lora
    method: concat
    loras:
      - {use: neon, strength: 0.8, te: 0.5, blocks: OUTD}
      - {use: noir, strength: -0.3}
  neon-noir:
    kind: checkpoint
    base: base
    loras:
      - {use: neon-noir-lora, strength: 0.75}
  pack:
    kind: release
    description: The pack, with its model card.
    publish: {to: "hf://acme/neon-pack"}
"""


def _invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """One project built once; tests work on copies."""
    project = tmp_path_factory.mktemp("publish") / "project"
    project.mkdir()
    (project / "models").symlink_to(MODELS, target_is_directory=True)
    (project / "recipe.yaml").write_text(RECIPE)
    result = _invoke("build", project / "recipe.yaml", "-q")
    assert result.exit_code == 0, result.output
    return project


@pytest.fixture
def project(built, tmp_path) -> Path:
    return Path(shutil.copytree(built, tmp_path / "project", symlinks=True))


@pytest.fixture
def hub(monkeypatch, tmp_path):
    import huggingface_hub.constants

    running = FakeHub().start()
    running.add_token(TOKEN, "ada", "write")
    running.add_token(READ_TOKEN, "ada", "read")
    monkeypatch.setenv("HF_ENDPOINT", running.base)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("HF_TOKEN_PATH", str(tmp_path / "no-token-file"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)  # read at import time
    yield running
    running.stop()


def _bundle(project: Path) -> dict[str, bytes]:
    folder = project / "dist" / "pack"
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def _lock(project: Path) -> dict:
    return json.loads((project / "recipe.lock").read_text())


def _publish(project: Path, *extra):
    return _invoke("publish", project / "recipe.yaml", "-q", *extra)


# --- publishing -------------------------------------------------------------------------


def test_publish_creates_the_repo_and_uploads_the_bundle_in_one_commit(project, hub):
    result = _publish(project)
    assert result.exit_code == 0, result.output
    bundle = _bundle(project)
    # The repository holds the bundle byte for byte (plus the .gitattributes the Hub creates), in one commit.
    assert hub.files_at(REPO) == {**bundle, ".gitattributes": hub.files_at(REPO, hub.repos[REPO].branches["main"])[".gitattributes"]}
    assert hub.commit_count(REPO) == 2  # the Hub's initial commit + ours
    assert len(hub.requests("POST", r"/commit/main$")) == 1
    # Large files went through the LFS batch endpoint and a PUT of their bytes; small ones inline in the commit.
    uploaded = {r.path.rsplit("/", 1)[1] for r in hub.requests("PUT", r"^/lfs/upload/")}
    safetensors = {hashlib.sha256(data).hexdigest() for name, data in bundle.items() if name.endswith(".safetensors")}
    assert uploaded == safetensors and len(safetensors) == 2
    head = hub.head(REPO)
    commit = hub.commits[head]
    assert commit.summary.startswith("Publish pack") and "manifest.json (sha256 " in commit.description
    # The lock records what was published; the token appears nowhere.
    entry = _lock(project)["published"]["pack"][f"hf://{REPO}@main"]
    assert entry["repo"] == REPO and entry["revision"] == "main" and entry["commit"] == head
    assert entry["manifest_sha256"] == hashlib.sha256(bundle["manifest.json"]).hexdigest()
    assert entry["endpoint"] == hub.base
    assert head in result.output and TOKEN not in result.output
    assert TOKEN not in (project / "recipe.lock").read_text()
    assert all(r.authorized for r in hub.requests("POST"))


def test_the_published_card_has_the_hub_metadata(project, hub):
    assert _publish(project).exit_code == 0
    card = hub.files_at(REPO)["README.md"].decode()
    assert card.startswith("---\n")
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta == {
        "license": "creativeml-openrail-m",
        "pipeline_tag": "text-to-image",
        "tags": ["stable-diffusion", "lora", "stable-diffusion-v1", "loraforge"],
    }  # local inputs have no Hub id, so no base_model
    assert hub.validated_yaml and hub.validated_yaml[-1] == card  # huggingface_hub had the Hub validate it first
    from huggingface_hub import ModelCard, ModelCardData

    parsed = ModelCard(card, ignore_metadata_errors=False)  # the library's own card parser and metadata model
    assert parsed.data.to_dict() == meta and ModelCardData(**meta).to_dict() == meta
    assert parsed.text.lstrip().startswith("# Neon Pack")
    manifest = json.loads(hub.files_at(REPO)["manifest.json"])
    for output in manifest["outputs"]:  # AutoV2 and AutoV3 in the card for Civitai users
        assert f"`{output['autov2']}`" in card and f"({output['autov3']})" in card


def test_publishing_the_same_bundle_again_makes_no_commit(project, hub):
    assert _publish(project).exit_code == 0
    head = hub.head(REPO)
    before = len(hub.log)
    result = _publish(project)
    assert result.exit_code == 0, result.output
    assert "already published" in result.output and "no commit made" in result.output and head in result.output
    assert hub.head(REPO) == head and hub.commit_count(REPO) == 2
    sent = [r for r in hub.log[before:] if r.method in ("POST", "PUT")]
    assert sent == []  # no create, preupload, upload or commit: the tree listing answered it
    assert _lock(project)["published"]["pack"][f"hf://{REPO}@main"]["commit"] == head


def test_a_changed_release_uploads_only_what_changed_and_removes_what_it_dropped(project, hub):
    assert _publish(project).exit_code == 0
    first = hub.head(REPO)
    puts = len(hub.requests("PUT"))
    recipe = project / "recipe.yaml"
    recipe.write_text(RECIPE.replace("description: The pack, with its model card.",
                                     "description: The pack, checkpoint only.\n    include: [neon-noir]"))
    result = _publish(project)
    assert result.exit_code == 0, result.output
    files = hub.files_at(REPO)
    assert set(files) == set(_bundle(project)) | {".gitattributes"}
    assert "neon-noir-lora.safetensors" not in files and "neon-noir-lora.merge.json" not in files
    assert len(hub.requests("PUT")) == puts  # the checkpoint's bytes were already on the Hub
    assert hub.commits[hub.head(REPO)].parent == first
    assert "1 deleted" not in result.output and "2 deleted" in result.output


def test_dry_run_changes_nothing_and_records_nothing(project, hub):
    result = _publish(project, "--dry-run")
    assert result.exit_code == 0, result.output
    assert "dry run" in result.output and "upload neon-noir.safetensors" in result.output
    assert REPO not in hub.repos
    assert not hub.requests("POST") and not hub.requests("PUT")
    assert "published" not in _lock(project)


def test_a_branch_and_a_private_repository(project, hub):
    result = _publish(project, "--to", f"hf://{REPO}@v1", "--private", "--message", "first cut")
    assert result.exit_code == 0, result.output
    assert hub.repos[REPO].private
    assert set(hub.files_at(REPO, "main")) == {".gitattributes"}  # main untouched
    assert "manifest.json" in hub.files_at(REPO, "v1")
    assert hub.commits[hub.head(REPO, "v1")].summary == "first cut"
    assert f"hf://{REPO}@v1" in _lock(project)["published"]["pack"]


# --- errors ------------------------------------------------------------------------------


def test_no_token_is_one_paragraph_and_nothing_is_sent(project, hub, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    result = _publish(project)
    assert result.exit_code == 2
    assert "No Hugging Face token found" in result.output and "HF_TOKEN" in result.output
    assert "Traceback" not in result.output
    assert not hub.requests("POST") and REPO not in hub.repos


def test_a_read_only_token_is_refused_and_the_repository_is_unchanged(project, hub, monkeypatch):
    hub.create_repo(REPO)
    head = hub.head(REPO)
    monkeypatch.setenv("HF_TOKEN", READ_TOKEN)
    result = _publish(project)
    assert result.exit_code == 2, result.output
    assert "no write permission" in result.output and "HTTP 403" in result.output
    assert f"still at commit {head[:12]}" in result.output
    assert hub.head(REPO) == head and READ_TOKEN not in result.output
    assert "published" not in _lock(project)


def test_an_invalid_token_says_so(project, hub, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_notAValidToken000000000000000")
    result = _publish(project)
    assert result.exit_code == 2
    assert "refused the token (HTTP 401)" in result.output and "hf_notAValid" not in result.output


def test_a_network_failure_at_the_commit_leaves_the_remote_as_it_was_and_a_rerun_finishes(project, hub):
    hub.create_repo(REPO)
    head = hub.head(REPO)
    hub.fail("POST", r"/commit/main$", "drop")
    result = _publish(project)
    assert result.exit_code == 2, result.output
    assert "connection" in result.output and f"Nothing was published: {REPO}@main is still at commit {head[:12]}" in result.output
    assert "Traceback" not in result.output
    assert hub.head(REPO) == head and "published" not in _lock(project)
    puts = len(hub.requests("PUT"))
    assert puts == 2  # the large files reached the Hub's storage before the commit failed
    result = _publish(project)
    assert result.exit_code == 0, result.output
    assert len(hub.requests("PUT")) == puts  # not sent twice
    assert hub.commit_count(REPO) == 2 and "manifest.json" in hub.files_at(REPO)


def test_a_branch_moved_meanwhile_is_not_overwritten(project, hub):
    hub.create_repo(REPO)
    hub.fail("POST", r"/commit/main$", 412)
    result = _publish(project)
    assert result.exit_code == 2
    assert "HTTP 412" in result.output and "Run the same command again" in result.output


def test_a_public_repository_is_not_published_to_privately(project, hub):
    hub.create_repo(REPO, private=False)
    result = _publish(project, "--private")
    assert result.exit_code == 2
    assert "exists and is public" in result.output and hub.commit_count(REPO) == 1


@pytest.mark.parametrize("destination, words", [
    ("hf://datasets/acme/pack", "dataset repository"),
    ("hf://spaces/acme/pack", "space repository"),
    ("https://huggingface.co/acme/pack", "not an hf:// address"),
    ("hf://acme/pack@0123456789abcdef0123456789abcdef01234567", "commit after '@'"),
])
def test_destinations_that_are_not_a_model_branch_are_refused(project, hub, destination, words):
    result = _publish(project, "--to", destination)
    assert result.exit_code == 2 and words in result.output
    assert not hub.log


def test_a_recipe_without_license_is_refused_before_building(project, hub):
    (project / "recipe.yaml").write_text(RECIPE.replace("license: creativeml-openrail-m\n", ""))
    result = _publish(project)
    assert result.exit_code == 2 and "needs a license" in result.output and "license: creativeml-openrail-m" in result.output
    assert not hub.log


def test_locked_refuses_a_stale_release(project, hub):
    (project / "dist" / "pack" / "README.md").write_text("edited by hand\n")
    result = _publish(project, "--locked")
    assert result.exit_code == 2, result.output
    assert "--locked" in result.output and "pack (stale)" in result.output
    assert not hub.log


def test_a_bundle_edited_after_its_build_is_refused(project):
    folder = project / "dist" / "pack"
    locked = _lock(project)["targets"]["pack"]["sha256"]
    read_bundle("pack", folder, locked)  # intact
    (folder / "README.md").write_bytes(b"edited\n")
    with pytest.raises(BuildError, match="changed since it was built: README.md"):
        read_bundle("pack", folder, locked)
    (folder / "README.md").unlink()
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(BuildError, match="missing"):
        read_bundle("pack", folder, locked)
    with pytest.raises(BuildError, match="manifest.json has sha256"):
        read_bundle("pack", folder, "0" * 64)


def test_destination_syntax():
    assert parse_destination("hf://acme/pack").url == "hf://acme/pack@main"
    assert parse_destination("hf://acme/pack@release/v2").revision == "release/v2"
    for bad in ("hf://acme", "hf://acme/pack/extra", "hf://acme/../x", "hf://acme/pack@"):
        with pytest.raises(DestinationSyntaxError):
            parse_destination(bad)


def test_publish_field_is_checked_with_the_recipe(project):
    (project / "recipe.yaml").write_text(RECIPE.replace('publish: {to: "hf://acme/neon-pack"}', 'publish: {to: "hf://datasets/a/b"}'))
    result = _invoke("plan", project / "recipe.yaml")
    assert result.exit_code == 2 and "dataset repository" in result.output and "recipe.yaml:29:" in result.output


# --- the card's Hub metadata (pure) ---------------------------------------------------------

HUB_RECIPE = """\
loraforge: 1
name: hub-pack
license: openrail++
inputs:
  base: {source: "hf://stabilityai/stable-diffusion-xl-base-1.0@main/sd_xl_base_1.0.safetensors"}
  tuned: {source: "hf://acme/xl-tuned/tuned.safetensors"}
  style: {source: "hf://acme/xl-style@v2/style.safetensors"}
  local: {source: models/local.safetensors}
targets:
  merged: {kind: lora, method: concat, loras: [{use: style}, {use: local}]}
  baked: {kind: checkpoint, base: base, loras: [{use: merged}, {use: local}]}
  extracted: {kind: extract, base: base, tuned: tuned, rank: 4}
  pack: {kind: release}
"""


def _contents(tmp_path, included: dict[str, str]):
    from loraforge.recipe.loader import load_recipe
    from loraforge.release.contents import BundledFile, BundledOutput, InputRecord, ReleaseContents

    path = tmp_path / "hub.yaml"
    path.write_text(HUB_RECIPE)
    recipe = load_recipe(path).recipe
    file = BundledFile("x", 1, "0" * 64)
    outputs = tuple(BundledOutput(name, recipe.targets[name].kind, file, None, None, arch) for name, arch in included.items())
    inputs = tuple(InputRecord(n, s.source, {}, None, "0" * 64) for n, s in sorted(recipe.inputs.items()))
    return ReleaseContents("pack", recipe, HUB_RECIPE, file, file, outputs, inputs, None, None, "0.1.0")


def test_card_metadata_names_hub_base_models_and_their_relation(tmp_path):
    from loraforge.release.card import front_matter, hub_metadata

    xl, xl_lora = "stable-diffusion-xl-v1-base", "stable-diffusion-xl-v1-base/lora"
    baked = hub_metadata(_contents(tmp_path, {"baked": xl}))
    assert baked["base_model"] == ["stabilityai/stable-diffusion-xl-base-1.0", "acme/xl-style"]  # through the chained merge
    assert baked["base_model_relation"] == "merge" and "library_name" not in baked
    assert baked["tags"] == ["stable-diffusion", "lora", xl, "loraforge"] and baked["license"] == "openrail++"
    extracted = hub_metadata(_contents(tmp_path, {"extracted": xl_lora}))
    assert extracted["base_model"] == ["stabilityai/stable-diffusion-xl-base-1.0"]  # what the adapter applies to
    assert extracted["base_model_relation"] == "adapter" and extracted["library_name"] == "diffusers"
    merged = hub_metadata(_contents(tmp_path, {"merged": xl_lora}))
    assert merged["base_model"] == ["acme/xl-style"] and merged["base_model_relation"] == "finetune"
    text = front_matter(_contents(tmp_path, {"baked": xl, "extracted": xl_lora}))
    meta = yaml.safe_load(text.split("---\n")[1])
    assert meta["base_model"] == ["stabilityai/stable-diffusion-xl-base-1.0", "acme/xl-style"]
    assert meta["base_model_relation"] == "merge" and meta["pipeline_tag"] == "text-to-image"
    assert text.endswith("---\n\n")
