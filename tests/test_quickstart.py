"""The README's quick start on a stock Debian or Ubuntu, where the system interpreter refuses
`pip install` (PEP 668) and there may be no `python` command: `./run test` and `./run` work
there as written, with Debian's own /usr/bin/python3 found through `#!/usr/bin/env python3`.

The tests share one copy of the repository's tracked files (a fresh checkout has no .venv);
whichever runs `./run` first installs requirements.txt into the copy's new .venv. That takes
7-9 s here, where pip has the wheels at hand, and the module 12-16 s; a first install that
downloads takes longer (the deadline is 10 minutes).
"""

from __future__ import annotations

import hashlib
import os
import queue
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from multiprocess_connection_manager import EmbeddedPostgres
from tests.conftest import ROOT, reachable_tempdir

SYSTEM_PYTHON = Path("/usr/bin/python3")
STAMP = Path(".venv") / ".dims-requirements.sha256"
INSTALLING = "run: installing requirements.txt"
INSTALL_TIMEOUT = 600   # a deadline for a first install that downloads; here it takes seconds


def _debian_python_problem() -> str | None:
    """Why /usr/bin/python3 is not a Debian-style system interpreter (None when it is one)."""
    if not SYSTEM_PYTHON.exists():
        return f"{SYSTEM_PYTHON} does not exist"
    probe = subprocess.run([str(SYSTEM_PYTHON), "-c", "import sys, sysconfig; print(sys.version_info >= (3, 11)); "
                            "print(sysconfig.get_path('stdlib'))"], capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        return f"{SYSTEM_PYTHON} does not run: {probe.stderr.strip()}"
    new_enough, stdlib = probe.stdout.split()
    if new_enough != "True":
        return f"{SYSTEM_PYTHON} is older than Python 3.11"
    if not (Path(stdlib) / "EXTERNALLY-MANAGED").exists():
        return f"{SYSTEM_PYTHON} is not externally managed (no {stdlib}/EXTERNALLY-MANAGED)"
    return None


_problem = _debian_python_problem()
pytestmark = pytest.mark.skipif(_problem is not None,
                                reason=f"needs Debian's system interpreter at {SYSTEM_PYTHON}: {_problem}")


def fresh_machine_env(**extra: str) -> dict[str, str]:
    """A plain system's environment: PATH has only /usr/bin and /bin (no pyenv, no activated
    environment), so `#!/usr/bin/env python3` is /usr/bin/python3. pip's own settings and the
    proxy variables stay: they are how this machine reaches its package index."""
    keep = {"HOME", "USER", "LOGNAME", "LANG", "LC_ALL", "LC_CTYPE", "SSL_CERT_FILE", "SSL_CERT_DIR"}
    env = {k: v for k, v in os.environ.items()
           if k in keep or k.startswith("PIP_") or k.lower().endswith("_proxy")}
    env.pop("PIP_BREAK_SYSTEM_PACKAGES", None)
    env.update(PATH="/usr/bin:/bin", **extra)
    return env


@pytest.fixture(scope="module")
def checkout():
    """The repository's tracked files, copied where the `postgres` OS user can reach them;
    afterwards the copy's embedded PostgreSQL (if the demo started one) is stopped."""
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, timeout=60)
    if listed.returncode != 0:
        pytest.skip(f"not a git checkout, so no list of tracked files: {listed.stderr.decode().strip()}")
    copy = reachable_tempdir("dims-quickstart-")
    try:
        for name in listed.stdout.decode().split("\0"):
            source = ROOT / name
            if name and (source.exists() or source.is_symlink()):   # a deleted file is still listed
                (copy / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, copy / name, follow_symlinks=False)
        yield copy
    finally:
        if (copy / "var").exists():
            EmbeddedPostgres(copy / "var").stop()
        shutil.rmtree(copy, ignore_errors=True)


def run(checkout: Path, *args: str, timeout: float = INSTALL_TIMEOUT) -> subprocess.CompletedProcess:
    """`./run ARGS` in the copy, as a user of a fresh Debian would type it."""
    return subprocess.run(["./run", *args], cwd=checkout, env=fresh_machine_env(), capture_output=True,
                          text=True, timeout=timeout)


def test_debians_python_refuses_pip_install_so_the_old_quick_start_fails(checkout):
    # --dry-run: the refusal comes before anything else, and should this system accept the
    # command after all, the test must still not install into it.
    refused = subprocess.run([str(SYSTEM_PYTHON), "-m", "pip", "install", "--dry-run", "-r", "requirements.txt"],
                             cwd=checkout, env=fresh_machine_env(), capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0, refused.stdout
    # Without python3-pip there is no pip at all, which stops the old command as surely.
    assert "externally-managed-environment" in refused.stderr or "No module named pip" in refused.stderr, \
        refused.stderr


def test_readme_test_command_installs_once_into_a_venv_of_debians_python_and_passes(checkout):
    shutil.rmtree(checkout / ".venv", ignore_errors=True)   # as fresh as a new checkout, in any test order
    first = run(checkout, "test", "tests/test_backoff.py")
    assert first.returncode == 0, first.stdout + first.stderr
    assert INSTALLING in first.stderr
    assert " passed" in first.stdout and "failed" not in first.stdout

    config = (checkout / ".venv" / "pyvenv.cfg").read_text()
    assert "home = /usr/bin\n" in config, config
    requirements = hashlib.sha256((checkout / "requirements.txt").read_bytes()).hexdigest()
    assert (checkout / STAMP).read_text().strip() == requirements
    stamped = (checkout / STAMP).stat().st_mtime_ns

    again = run(checkout, "test", "tests/test_backoff.py", "-k", "jitter")
    assert again.returncode == 0, again.stdout + again.stderr
    assert INSTALLING not in again.stderr, again.stderr
    assert "deselected" in again.stdout    # the arguments reach pytest
    assert (checkout / STAMP).stat().st_mtime_ns == stamped

    # A changed requirements.txt is installed again; `./run --help` is main.py's help.
    with open(checkout / "requirements.txt", "a") as fh:
        fh.write("# changed\n")
    changed = run(checkout, "--help")
    assert changed.returncode == 0, changed.stdout + changed.stderr
    assert INSTALLING in changed.stderr
    assert "usage: main.py" in changed.stdout and "--single" in changed.stdout
    assert (checkout / STAMP).read_text().strip() == \
        hashlib.sha256((checkout / "requirements.txt").read_bytes()).hexdigest()


def test_readme_run_command_starts_the_demo_and_ctrl_c_stops_it(checkout):
    env = fresh_machine_env(PYTHONUNBUFFERED="1", TMPDIR=str(checkout))   # AF_UNIX paths stay short
    process = subprocess.Popen(["./run"], cwd=checkout, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stdout], daemon=True).start()
    seen: list[str] = []

    def wait_for(*needles: str, within: float) -> None:
        deadline = time.monotonic() + within
        while not all(any(needle in line for line in seen) for needle in needles):
            try:
                seen.append(lines.get(timeout=max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                pytest.fail(f"no {needles} within {within:g} s; output:\n{''.join(seen)}")

    try:
        wait_for("DIMS demo", "bot alpha: STARTING -> RUNNING", "bot beta: STARTING -> RUNNING",
                 within=INSTALL_TIMEOUT)
        assert (checkout / "var" / "postgres" / "data" / "PG_VERSION").exists()   # under the copy's ./var
        os.killpg(process.pid, signal.SIGINT)     # Ctrl-C: the whole foreground process group
        assert process.wait(60) == 0, "".join(seen)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)
