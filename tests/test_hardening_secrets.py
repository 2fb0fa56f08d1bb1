"""Issue 17, Medium 9: a secret in a source URL is not copied into what loraforge records.

The recipe names its LoRA by a tokenised URL with a password; after a
build with a release target, neither secret appears in the lock, the
release README or manifest, or `plan --json`.
"""

from __future__ import annotations

import hashlib
import json

import pytest

from hostile import OUTPUT, make_project, run_cli, write_models
from resolve_helpers import fast_http, server  # noqa: F401
from loraforge.resolve.secrets import redact_url
from loraforge.testing.adapters import write_synthetic_adapter
from loraforge.testing.arch import tiny_architecture
from loraforge.testing.http_server import Blob

TOKEN, PASSWORD = "tok3nVALUE", "passw0rdVALUE"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return write_models(tmp_path_factory.mktemp("models"))


def _project(folder, models, server):  # noqa: F811
    data = (models / "style.safetensors").read_bytes()
    server.routes["/loras/style.safetensors"] = Blob(data)
    project = make_project(folder, models)
    url = server.url("/loras/style.safetensors").replace("http://", f"http://me:{PASSWORD}@") + f"?type=Model&token={TOKEN}"
    recipe = project / "recipe.yaml"
    text = recipe.read_text().replace("{source: models/style.safetensors}", f"{{source: '{url}', sha256: {hashlib.sha256(data).hexdigest()}}}")
    recipe.write_text(text + "  pack:\n    kind: release\n    include: [baked]\n    output: dist/pack\n")
    return project


def test_secrets_in_a_source_url_stay_out_of_the_lock_and_the_release(server, fast_http, models):  # noqa: F811
    project = _project(fast_http / "project", models, server)
    code, output = run_cli("build", project / "recipe.yaml", "-q")
    assert code == 0, output
    recorded = [project / "recipe.lock", project / "dist/pack/README.md", project / "dist/pack/recipe.lock"]
    for path in recorded:
        text = path.read_text()
        assert TOKEN not in text and PASSWORD not in text, path
    assert "token=REDACTED" in (project / "recipe.lock").read_text()
    code, output = run_cli("plan", "--json", project / "recipe.yaml")
    assert code == 0 and TOKEN not in output and PASSWORD not in output
    # A second build trusts the redacted lock entry (no re-resolution, nothing rebuilt).
    code, output = run_cli("build", project / "recipe.yaml", "-q", "--locked")
    assert code == 0, output


def test_secrets_stay_out_of_output_metadata_and_the_manifest(server, fast_http, models):  # noqa: F811
    project = _project(fast_http / "project", models, server)
    assert run_cli("build", project / "recipe.yaml", "-q")[0] == 0
    bundle = project / "dist/pack"
    for path in (project / OUTPUT, bundle / OUTPUT.name, bundle / "manifest.json", bundle / "recipe.yaml"):
        data = path.read_bytes()
        assert TOKEN.encode() not in data and PASSWORD.encode() not in data, path


def test_a_redacted_lock_entry_is_kept_when_its_input_is_not_resolved(server, fast_http, models):  # noqa: F811
    # A second target reads only local files; building it alone must keep the secret input's
    # (redacted) lock entry, which lock_sync.updated_lock compares with the recipe's source.
    project = _project(fast_http / "project", models, server)
    write_synthetic_adapter(project / "models/other.safetensors", tiny_architecture("sd1"), "lora", rank=4, seed=3)
    recipe = project / "recipe.yaml"
    text = recipe.read_text().replace("inputs:\n", "inputs:\n  other: {source: models/other.safetensors}\n")
    text = text.replace("  pack:\n", "  plain:\n    kind: checkpoint\n    base: base\n    loras:\n      - {use: other, strength: 0.5}\n  pack:\n")
    recipe.write_text(text)
    code, output = run_cli("build", recipe, "-q")
    assert code == 0, output
    entry = json.loads((project / "recipe.lock").read_text())["inputs"]["style"]
    assert entry["source"] == redact_url(entry["source"]) and "REDACTED" in entry["source"]
    code, output = run_cli("build", recipe, "plain", "-q", "--force")
    assert code == 0, output
    assert json.loads((project / "recipe.lock").read_text())["inputs"]["style"] == entry
    code, output = run_cli("build", recipe, "-q", "--locked")
    assert code == 0, output


@pytest.mark.parametrize(
    "url,expected",
    [
        ("https://h.example/x.safetensors?token=abc&type=Model", "https://h.example/x.safetensors?token=REDACTED&type=Model"),
        ("https://u:p@h.example/x", "https://REDACTED@h.example/x"),
        ("https://h.example/x?X-Amz-Signature=s&api_key=k&Signature=z", "https://h.example/x?X-Amz-Signature=REDACTED&api_key=REDACTED&Signature=REDACTED"),
        ("https://h.example/x?format=SafeTensor&size=pruned", "https://h.example/x?format=SafeTensor&size=pruned"),
        ("models/x?token=abc.safetensors", "models/x?token=abc.safetensors"),  # a path is a path
        ("hf://org/repo@main/x.safetensors", "hf://org/repo@main/x.safetensors"),
    ],
)
def test_redact_url(url, expected):
    assert redact_url(url) == expected
