"""Issue 17, Low items: each case through the CLI ends in one paragraph (or one line), the right exit
status, no traceback, no hang, and nothing written.

Damaged lock files (resolve/lockfile.py), --memory-budget nanG (execute/jobs.py), SIGTERM while
plan/fetch/lock wait on the network (cli.py, cli_resolve.py: 143, not 130).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from hostile import OUTPUT, assert_clear_refusal, make_project, run_cli, snapshot, write_models
from resolve_helpers import fast_http, server  # noqa: F401
from loraforge.testing.http_server import Blob, Redirect


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return write_models(tmp_path_factory.mktemp("models"))


@pytest.fixture
def built(tmp_path, models):
    """A project built once: a valid lock to damage."""
    root = make_project(tmp_path / "project", models)
    code, output = run_cli("build", root / "recipe.yaml", "-q")
    assert code == 0, output
    return root


def _one_paragraph(output: str) -> None:
    assert output.strip().count("\n\n") == 0, output


def _deep(depth: int) -> str:
    return '{"format": "loraforge-lock/1", "inputs": ' + "[" * depth + "]" * depth + "}"


def _valid(root) -> dict:
    return json.loads((root / "recipe.lock").read_text())


DAMAGED = {
    "not UTF-8": (lambda root: (root / "recipe.lock").write_bytes(b'{"format": "loraforge-lock/1", "x": "\xff\xfe"}'),
                  ["is not UTF-8 text"]),
    "deep JSON": (lambda root: (root / "recipe.lock").write_text(_deep(100_000)), ["is not a loraforge lock"]),
    "inputs is a list": (lambda root: (root / "recipe.lock").write_text(json.dumps({**_valid(root), "inputs": []})),
                         ['"inputs" is an array, not an object']),
    "numeric_policy is a list": (lambda root: (root / "recipe.lock").write_text(json.dumps({**_valid(root), "numeric_policy": [1]})),
                                 ['"numeric_policy" is an array, not an object']),
    "a sha256 that is a number": (
        lambda root: (root / "recipe.lock").write_text(json.dumps(
            {**_valid(root), "inputs": {**_valid(root)["inputs"], "style": {**_valid(root)["inputs"]["style"], "sha256": 5}}})),
        ["inputs.style.sha256 is a number, not a string"]),
    "a target entry that is a string": (
        lambda root: (root / "recipe.lock").write_text(json.dumps({**_valid(root), "targets": {"baked": "x"}})),
        ["targets.baked is a string, not an object"]),
    "an action key that is an object": (
        lambda root: (root / "recipe.lock").write_text(json.dumps(
            {**_valid(root), "targets": {"baked": {**_valid(root)["targets"]["baked"], "action_key": {}}}})),
        ["targets.baked.action_key is an object, not a string"]),
    "a size that is a boolean": (
        lambda root: (root / "recipe.lock").write_text(json.dumps(
            {**_valid(root), "targets": {"baked": {**_valid(root)["targets"]["baked"], "size": True}}})),
        ["targets.baked.size is a boolean, not a number"]),
    "a link to /dev/zero": (lambda root: ((root / "recipe.lock").unlink(), (root / "recipe.lock").symlink_to("/dev/zero")),
                            ["is not a regular file"]),
    "a FIFO": (lambda root: ((root / "recipe.lock").unlink(), os.mkfifo(root / "recipe.lock")), ["is not a regular file"]),
    "a folder": (lambda root: ((root / "recipe.lock").unlink(), (root / "recipe.lock").mkdir()), ["is not a regular file"]),
}


@pytest.mark.parametrize("case", sorted(DAMAGED))
@pytest.mark.parametrize("command", ["build", "plan"])
def test_a_damaged_lock_is_one_paragraph(built, case, command):
    damage, fragments = DAMAGED[case]
    damage(built)
    before = snapshot(built)
    code, output = run_cli(command, built / "recipe.yaml", *(["-q", "--force"] if command == "build" else []))
    assert_clear_refusal(code, output, [str(built / "recipe.lock"), *fragments])
    _one_paragraph(output)
    assert snapshot(built) == before


@pytest.mark.parametrize("budget", ["nanG", "NaN", "infG", "-1G", "0", "12X"])
def test_a_memory_budget_that_is_not_a_size_is_refused_before_anything_runs(tmp_path, models, budget):
    root = make_project(tmp_path / "project", models)
    code, output = run_cli("build", root / "recipe.yaml", "-q", "--memory-budget", budget)
    assert_clear_refusal(code, output, [f"--memory-budget {budget!r} is not a size", "12G"])
    _one_paragraph(output)
    assert not (root / OUTPUT).exists() and not (root / "recipe.lock").exists()


# --- SIGTERM while waiting on the network ----------------------------------------


@pytest.mark.parametrize("command", ["plan", "fetch", "lock"])
def test_sigterm_during_plan_fetch_or_lock_exits_143(tmp_path, fast_http, server, models, command):  # noqa: F811
    data = (models / "style.safetensors").read_bytes()
    server.routes["/slow.safetensors"] = Blob(data, delay=60)  # the answer never comes in time
    server.routes["/start"] = Redirect(server.url("/slow.safetensors"))  # logged at once: the command is waiting now
    root = make_project(tmp_path / "project", models)
    recipe = root / "recipe.yaml"
    pin = "" if command == "lock" else f", sha256: {hashlib.sha256(data).hexdigest()}"
    recipe.write_text(recipe.read_text().replace("{source: models/style.safetensors}", f"{{source: '{server.url('/start')}'{pin}}}"))
    env = {**os.environ, "LORAFORGE_HTTP_TIMEOUT": "120"}
    process = subprocess.Popen([sys.executable, "-m", "loraforge.cli", command, str(recipe), *([] if command == "plan" else ["-q"])],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 60
        while not server.requests("/start") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.requests("/start"), "the command never asked the server"
        time.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == 143, (process.returncode, stderr)
    assert "Traceback" not in stderr and stderr.startswith("interrupted:") and stderr.strip().count("\n") == 0, stderr
    if command == "lock":
        assert f"{root / 'recipe.lock'} is unchanged" in stderr
    assert not (root / "recipe.lock").exists()


# --- downloads stop at the pinned size ----------------------------------------------


def test_a_download_larger_than_the_pinned_size_is_stopped_and_nothing_is_stored(tmp_path, fast_http, server, models, monkeypatch):  # noqa: F811
    data = (models / "style.safetensors").read_bytes()
    server.routes["/style.safetensors"] = Blob(data)
    root = make_project(tmp_path / "project", models)
    recipe = root / "recipe.yaml"
    recipe.write_text(recipe.read_text().replace("{source: models/style.safetensors}", f"{{source: '{server.url('/style.safetensors')}'}}"))
    code, output = run_cli("build", recipe, "-q")
    assert code == 0, output
    assert json.loads((root / "recipe.lock").read_text())["inputs"]["style"]["size"] == len(data)
    # Another machine (an empty store) builds from the lock; the server now answers 4 MiB of something else.
    monkeypatch.setenv("LORAFORGE_CACHE", str(tmp_path / "other-cache"))
    server.routes["/style.safetensors"] = Blob(b"x" * (4 << 20))
    code, output = run_cli("build", recipe, "-q", "--force")
    assert_clear_refusal(code, output, ["Input 'style'", "declares 4,194,304 bytes", f"the {len(data):,} bytes the lock pins",
                                                  "nothing was stored"])
    _one_paragraph(output)
    store = tmp_path / "other-cache/store"
    assert not [p for p in (store / "blobs").rglob("*") if p.is_file()]
    assert not [p for p in (store / "partial").rglob("*") if p.is_file()]


# --- files that are not files ----------------------------------------------------------


@pytest.mark.parametrize("kind", ["fifo", "/dev/zero"])
def test_inspect_on_a_named_pipe_or_a_device_is_refused_without_waiting(tmp_path, kind):
    if kind == "fifo":
        path = tmp_path / "pipe.safetensors"
        os.mkfifo(path)  # nobody writes: opening it for reading would wait for ever
    else:
        path = tmp_path / "zero.safetensors"
        path.symlink_to("/dev/zero")  # never ends
    code, output = run_cli("inspect", path)
    assert_clear_refusal(code, output, [str(path), "is not a regular file"])
    _one_paragraph(output)


def _mkfifo(root):
    os.mkfifo(root / "models/pipe.safetensors")
    return "models/pipe.safetensors"


SOURCES = {
    "a FIFO": (_mkfifo, ["does not exist or is not a regular file"]),
    "/proc/self/mem": (lambda root: "/proc/self/mem", ["a file the kernel makes up (under /proc)"]),
    "/proc/kmsg": (lambda root: "/proc/kmsg", ["a file the kernel makes up (under /proc)"]),
    "/sys": (lambda root: "/sys/kernel/mm/transparent_hugepage/enabled", ["a file the kernel makes up (under /sys)"]),
    "file:// with %00": (lambda root: f"file://{root}/models/style%00.safetensors", ["NUL byte (%00)"]),
}


@pytest.mark.parametrize("case", sorted(SOURCES))
def test_a_source_that_is_not_a_model_file_is_refused(tmp_path, models, case):
    root = make_project(tmp_path / "project", models)
    make_source, fragments = SOURCES[case]
    source = make_source(root)
    recipe = root / "recipe.yaml"
    recipe.write_text(recipe.read_text().replace("{source: models/style.safetensors}", f"{{source: '{source}'}}"))
    before = snapshot(root)
    code, output = run_cli("build", recipe, "-q")
    assert_clear_refusal(code, output, ["inputs.style.source", *fragments])
    _one_paragraph(output)
    assert snapshot(root) == before


# --- strength: 1e-3 ---------------------------------------------------------------------


def test_strength_in_e_notation_is_a_number(tmp_path, models):
    """YAML 1.1 reads an unquoted 1e-3 as text, and the recipe answered "remove the quotes" for a value
    without quotes; the recipe loader reads it as the number it is (recipe/yaml_source.py)."""
    plain = make_project(tmp_path / "plain", models)
    (plain / "recipe.yaml").write_text((plain / "recipe.yaml").read_text().replace("strength: 0.7", "strength: 0.001"))
    e_form = make_project(tmp_path / "e-form", models)
    (e_form / "recipe.yaml").write_text((e_form / "recipe.yaml").read_text().replace("strength: 0.7", "strength: 1e-3"))
    for root in (plain, e_form):
        code, output = run_cli("build", root / "recipe.yaml", "-q")
        assert code == 0, output
    assert (plain / OUTPUT).read_bytes() == (e_form / OUTPUT).read_bytes()
    quoted = make_project(tmp_path / "quoted", models)
    (quoted / "recipe.yaml").write_text((quoted / "recipe.yaml").read_text().replace("strength: 0.7", "strength: '1e-3'"))
    code, output = run_cli("build", quoted / "recipe.yaml", "-q")
    assert_clear_refusal(code, output, ["strength", "remove the quotes: write 1e-3 instead of '1e-3'"])


# --- recipes: a NUL byte; recipe.yaml and recipe.yml side by side ----------------------------


def test_a_nul_byte_in_a_recipe_is_one_positioned_paragraph(tmp_path, models):
    root = make_project(tmp_path / "project", models)
    recipe = root / "recipe.yaml"
    recipe.write_bytes(recipe.read_bytes().replace(b"name: hostile", b"name: hos\x00tile"))
    code, output = run_cli("plan", recipe)
    assert_clear_refusal(code, output, [f"{recipe}:2:10", "U+0000", "which YAML does not allow"])
    _one_paragraph(output)


def test_recipe_yaml_and_recipe_yml_do_not_share_one_lock(tmp_path, models):
    root = make_project(tmp_path / "project", models)
    (root / "recipe.yml").write_text((root / "recipe.yaml").read_text().replace("strength: 0.7", "strength: 0.2"))
    before = snapshot(root)
    for name in ("recipe.yaml", "recipe.yml"):
        code, output = run_cli("build", root / name, "-q")
        assert_clear_refusal(code, output, ["recipe.yaml and recipe.yml", "would share the lock file recipe.lock", "Rename one"])
        _one_paragraph(output)
    assert snapshot(root) == before


def test_an_empty_lora_is_refused_instead_of_baking_nothing(tmp_path, models):
    root = make_project(tmp_path / "project", models)
    from safetensors.torch import save_file

    save_file({}, root / "models/style.safetensors", metadata={"ss_network_module": "networks.lora"})
    before = snapshot(root)
    code, output = run_cli("build", root / "recipe.yaml", "-q")
    assert_clear_refusal(code, output, ["targets.baked.loras[0].use", "'style' (style.safetensors) holds no adapter tensors",
                                        "would change nothing"])
    _one_paragraph(output)
    assert snapshot(root) == before


def test_a_base_without_a_text_encoder_is_named_as_such_at_plan_time(tmp_path, models):
    """Was: the bake failed with "the base changed since planning" (the TE modules matched the family's table)."""
    from safetensors.torch import load_file, save_file

    root = make_project(tmp_path / "project", models)
    base = load_file(root / "models/base.safetensors")
    save_file({k: v for k, v in base.items() if not k.startswith("cond_stage_model.")}, root / "models/base.safetensors")
    before = snapshot(root)
    code, output = run_cli("build", root / "recipe.yaml", "-q")
    assert_clear_refusal(code, output, ["targets.baked.base", "that 'style' adapt are not in the base file (the base has no text encoder)",
                                        "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight", "`te: 0`"])
    _one_paragraph(output)
    assert "changed since planning" not in output
    assert snapshot(root) == before
    recipe = root / "recipe.yaml"
    recipe.write_text(recipe.read_text().replace("{use: style, strength: 0.7}", "{use: style, strength: 0.7, te: 0}"))
    code, output = run_cli("build", recipe, "-q")
    assert code == 0, output
