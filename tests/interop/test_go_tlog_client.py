"""Our transparency log read by a client we did not write: Go's golang.org/x/mod/sumdb packages
(note, tlog), as Debian packages them (golang-go, golang-golang-x-mod-dev; .ci/run installs
them). The Go program (tlogclient/main.go) verifies the checkpoint with the pinned key, loads the
tree through C2SP tiles (tlog checks each tile against the signed root), checks every entry
bundle against the leaves, and computes inclusion and consistency proofs itself, which must verify
and equal the service's."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.fixtures import digit_files

pytestmark = pytest.mark.timeout(300)

CLIENT = Path(__file__).parent / "tlogclient"
GOPATH = "/usr/share/gocode"  # where Debian's golang-golang-x-mod-dev puts golang.org/x/mod


@pytest.fixture(scope="module")
def go_client(tmp_path_factory) -> Path:
    go = shutil.which("go")
    assert go and Path(GOPATH, "src/golang.org/x/mod/sumdb/tlog").is_dir(), (
        "needs Debian's golang-go and golang-golang-x-mod-dev (apt-get install -y golang-go golang-golang-x-mod-dev)"
    )
    binary = tmp_path_factory.mktemp("go") / "tlogclient"
    env = {**os.environ, "GO111MODULE": "off", "GOPATH": GOPATH, "GOFLAGS": "",
           "GOCACHE": str(tmp_path_factory.mktemp("gocache"))}
    built = subprocess.run([go, "build", "-o", str(binary), "."], cwd=CLIENT, env=env, capture_output=True,
                           text=True, timeout=240)
    assert built.returncode == 0, built.stderr
    return binary


@pytest.fixture(scope="module")
def service_env() -> dict[str, str]:
    return {"CHECKPOINT_INTERVAL_MS": "100"}


def test_go_sumdb_tlog_reads_and_verifies_our_log(go_client, service, client):
    files = digit_files()
    def upload(i: int, wait: bool = False) -> dict:
        path, _ = files[i % len(files)]
        answer = client.post("/prediction/", files={"file": (path.name, path.read_bytes(), "image/png")},
                             headers={"Prefer": "wait=checkpoint"} if wait else {})
        assert answer.status_code == 201, answer.text
        return answer.json()

    for i in range(60):
        upload(i)
    old = upload(60, wait=True)["receipt"]["events"][-1]["position"]
    for i in range(80):  # past one full tile of 256 leaves, ending in a partial one
        upload(i)
    upload(0, wait=True)
    key = client.get("/checkpoint/key").text.strip()
    done = subprocess.run([str(go_client), service.url, key, str(old)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "OK" in done.stdout and "entries: all" in done.stdout, done.stdout

    stranger = subprocess.run([str(go_client), service.url, key.replace(key[-8:], "AAAAAAA="), str(old)],
                              capture_output=True, text=True, timeout=60)
    assert stranger.returncode == 1, stranger.stdout
