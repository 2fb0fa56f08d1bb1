"""Shared test setup: caches and $TMPDIR in folders of the test session's own; one torch thread."""

import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def private_tmpdir(tmp_path_factory):
    """$TMPDIR (here and in the CLI subprocesses) is a folder of this session's own.

    Every loraforge command removes the leftovers of dead runs it finds in
    $TMPDIR (loraforge/scratch.py), and some tests plant such leftovers there
    and count what is removed: in a shared /tmp another test session (a
    colleague's, or another pytest-xdist worker) could remove or add some in
    between.
    """
    # A short path beside the session's basetemp, not under it: Ray (tests/test_ray_executor.py) puts its
    # AF_UNIX sockets in $TMPDIR/ray/session_…/sockets, and such a path may not exceed 107 bytes.
    tmp_path_factory.getbasetemp()  # chosen (in the usual temp dir) before $TMPDIR changes
    folder = Path(tempfile.mkdtemp(prefix="lf-tmp-"))
    previous_env, previous_tempdir = os.environ.get("TMPDIR"), tempfile.tempdir
    os.environ["TMPDIR"] = str(folder)
    tempfile.tempdir = str(folder)
    yield folder
    tempfile.tempdir = previous_tempdir
    if previous_env is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = previous_env
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """The tests' own tensors are tiny: torch's thread pool only adds waiting, most of all on a busy machine.

    loraforge's runs are single-threaded in torch anyway (execute/device.py
    one_thread_per_module; the bake runs one torch thread), so this changes
    the speed of the references, producers and synthetic models, not what
    is tested. Thread counts are tested where they matter: builds in
    subprocesses with their own OMP/MKL settings and ``torch.set_num_threads``
    (test_reproducible_bytes, test_cli, test_release, test_extract, ...).
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("LORAFORGE_CACHE", str(tmp_path_factory.getbasetemp() / "loraforge-cache"))
