"""DVC remotes for real: the default local-directory remote, and S3 against moto's S3 server on 127.0.0.1.

moto's ThreadedMotoServer is the S3-protocol server DVC's own S3 plugin tests use. It keeps its
buckets in this process, so stopping it mid-push and starting it again on the same port behaves
like an S3 endpoint that went away and came back. Only the cloud account is stood in for.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import socket
import threading
from pathlib import Path

import pytest
import yaml

from dvc_repo import ROOT, copy_repo, run

pytestmark = pytest.mark.integration  # starts git, DVC, a server, Jupyter or make

NSHARDS = 150
BUILT = ["prepare", "data/shards.dvc"]  # the later stages have no outputs in these copies
CREDS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def lock_outs(repo: Path) -> dict[str, str]:
    """Every output file's md5 as DVC recorded it in dvc.lock and .dvc files (directories expanded)."""
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    outs = [out for stage in lock["stages"].values() for out in stage.get("outs", [])]
    for dvcfile in (p for p in repo.rglob("*.dvc") if p.is_file() and ".venv" not in p.parts):
        outs += [
            out | {"path": str(dvcfile.parent.relative_to(repo) / out["path"])}
            for out in yaml.safe_load(dvcfile.read_text())["outs"]
        ]
    files = {}
    for out in outs:
        if out["md5"].endswith(".dir"):
            h = out["md5"].removesuffix(".dir")
            manifest = json.loads((repo / ".dvc/cache/files/md5" / h[:2] / (h[2:] + ".dir")).read_text())
            files |= {f"{out['path']}/{e['relpath']}": e["md5"] for e in manifest}
        else:
            files[out["path"]] = out["md5"]
    return files


@pytest.fixture()
def built(tmp_path: Path) -> Path:
    """A repo copy with the prepare stage run and a 150-file dataset added, committed."""
    repo = copy_repo(tmp_path / "repo")
    (repo / "dvc.lock").unlink()  # the committed lock lists every stage's outputs; here only prepare's exist
    run(["dvc", "repro", "prepare"], repo)
    shards = repo / "data/shards"  # a data set of its own, not an input of prepare (data/raw)
    shards.mkdir()
    for i in range(NSHARDS):
        (shards / f"part-{i:03d}.txt").write_text(f"shard {i}\n" * (5000 + i))
    run(["dvc", "add", "data/shards"], repo)
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "outputs"], repo)
    return repo


def test_default_remote_is_a_directory_outside_the_repo(tmp_path: Path, built: Path):
    listing = run(["dvc", "remote", "list"], built).stdout.split()
    assert listing[0] == "local" and not Path(listing[1]).resolve().is_relative_to(built.resolve())
    store = tmp_path / "store"
    run(["dvc", "remote", "modify", "--local", "local", "url", str(store)], built)  # the documented override
    run(["make", "--no-print-directory", "push"], built)
    assert sum(1 for p in store.rglob("*") if p.is_file()) > NSHARDS
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(built), str(clone)], tmp_path)
    run(["dvc", "remote", "modify", "--local", "local", "url", str(store)], clone)
    run(["python", "-m", "llmft.tools.remote", "pull", *BUILT], clone)  # what make pull runs, on the stages built here
    assert {p: md5(clone / p) for p in lock_outs(built)} == lock_outs(built)
    assert "up to date" in run(["dvc", "status", "prepare", "data/shards.dvc"], clone).stdout


class KillableEndpoint:
    """A TCP front for the S3 server that can die like a killed process: `kill()` (or the Nth PUT
    request, with `kill_after_puts`) closes the listener and every open connection at once."""

    def __init__(self, port: int, target: int):
        self.port, self.target, self.kill_after_puts = port, target, None
        self.puts, self.conns, self.listener, self.dead = 0, [], None, False

    def start(self) -> None:
        self.dead = False
        self.listener = socket.create_server(("127.0.0.1", self.port), reuse_port=True)
        threading.Thread(target=self._accept, args=(self.listener,), daemon=True).start()

    def kill(self) -> None:
        self.dead, self.kill_after_puts = True, None
        for sock in [self.listener, *self.conns]:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
        self.conns = []

    def _accept(self, listener) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            if self.dead:  # a dead endpoint accepts nothing
                client.close()
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            self.conns += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, src, dst, from_client: bool) -> None:
        try:
            while data := src.recv(65536):
                if from_client and data.startswith(b"PUT /"):
                    self.puts += 1
                    if self.kill_after_puts and self.puts >= self.kill_after_puts:
                        self.kill()
                        return
                dst.sendall(data)
        except OSError:
            pass


class S3:
    def __init__(self):
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
        self.server.start()
        self.endpoint = KillableEndpoint(free_port(), self.server.get_host_and_port()[1])
        self.endpoint.start()
        self.port = self.endpoint.port

    def stop(self):
        self.endpoint.kill()
        self.server.stop()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.url,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
        )

    def count(self, bucket: str) -> int:
        """Objects stored, read from moto's in-process backend (no HTTP, so it works while the server is down)."""
        from moto.core import DEFAULT_ACCOUNT_ID
        from moto.s3.models import s3_backends

        return len(s3_backends[DEFAULT_ACCOUNT_ID]["aws"].buckets[bucket].keys)


_BUCKETS = itertools.count()


@pytest.fixture()
def s3(monkeypatch):
    for k, v in CREDS.items():
        monkeypatch.setenv(k, v)
    server = S3()
    # moto keeps buckets per process: a fresh bucket per test keeps the tests independent.
    server.bucket = f"llm-dvc-{next(_BUCKETS)}"
    server.client().create_bucket(Bucket=server.bucket)
    yield server
    server.stop()


def use_s3(repo: Path, s3: S3) -> None:
    run(["dvc", "remote", "add", "-f", "-d", "s3", f"s3://{s3.bucket}/store"], repo)
    run(["dvc", "remote", "modify", "s3", "endpointurl", s3.url], repo)
    # Credentials go to the untracked .dvc/config.local, never to .dvc/config.
    run(["dvc", "remote", "modify", "--local", "s3", "access_key_id", "testing"], repo)
    run(["dvc", "remote", "modify", "--local", "s3", "secret_access_key", "testing"], repo)


def test_s3_push_fresh_clone_pull_matches_lock(tmp_path: Path, built: Path, s3: S3):
    use_s3(built, s3)
    assert "testing" not in (built / ".dvc/config").read_text()
    run(["git", "commit", "-qam", "s3 remote"], built)
    run(["dvc", "push"], built, env=CREDS)
    assert s3.count(s3.bucket) > NSHARDS
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(built), str(clone)], tmp_path)
    run(["dvc", "pull", *BUILT], clone, env=CREDS)
    assert {p: md5(clone / p) for p in lock_outs(built)} == lock_outs(built)
    status = run(["dvc", "status", "-c"], clone, env=CREDS).stdout
    assert "are in sync" in status


def test_push_killed_midway_resumes_and_sends_only_the_rest(tmp_path: Path, built: Path, s3: S3):
    use_s3(built, s3)
    run(["git", "commit", "-qam", "s3 remote"], built)
    env = CREDS | {"AWS_MAX_ATTEMPTS": "2"}  # fail fast against the dead endpoint
    s3.endpoint.kill_after_puts = 40  # the endpoint dies in the middle of the push
    push = run(["dvc", "push", "-j", "1"], built, check=False, env=env, timeout=600)
    assert push.returncode != 0, push.stdout
    s3.endpoint.start()  # ...and comes back
    sent_first = s3.count(s3.bucket)
    assert 0 < sent_first < NSHARDS + 4
    second = run(["dvc", "push"], built, env=CREDS).stdout
    pushed = int(second.split(" file")[0].split()[-1])
    total = s3.count(s3.bucket)
    assert pushed == total - sent_first  # only what was missing
    assert "Everything is up to date" in run(["dvc", "push"], built, env=CREDS).stdout
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(built), str(clone)], tmp_path)
    run(["dvc", "pull", *BUILT], clone, env=CREDS)
    assert {p: md5(clone / p) for p in lock_outs(built)} == lock_outs(built)


def test_corrupted_cache_object_fails_push_and_checkout(tmp_path: Path, built: Path):
    run(["dvc", "remote", "modify", "--local", "local", "url", str(tmp_path / "store")], built)
    victim = built / "data/shards/part-007.txt"
    h = md5(victim)
    obj = built / ".dvc/cache/files/md5" / h[:2] / h[2:]
    obj.chmod(0o644)
    obj.write_text("bit rot\n")
    proc = run(["make", "--no-print-directory", "push"], built, check=False)
    assert proc.returncode != 0
    assert h in proc.stderr and "corrupted or missing" in proc.stderr
    victim.unlink()
    assert run(["dvc", "checkout", "data/shards"], built, check=False).returncode != 0
    assert not victim.exists()  # the bad bytes never reach the workspace


def test_no_credentials_in_tracked_files():
    tracked = run(["git", "ls-files"], ROOT).stdout.splitlines()
    patterns = (
        "AKIA",
        "aws_secret_access_key",
        "secret_access_key =",
        "access_key_id =",
        "gdrive_client_secret",
        "password =",
        "BEGIN RSA PRIVATE KEY",
        "BEGIN OPENSSH PRIVATE KEY",
    )
    for name in tracked:
        path = ROOT / name
        if path.is_file() and path.stat().st_size < 2_000_000 and not name.startswith("tests/"):
            text = path.read_text(encoding="utf-8", errors="ignore")
            for pat in patterns:
                assert pat not in text, (
                    f"{name} contains {pat!r}: credentials belong in .dvc/config.local or the environment"
                )
    assert ".dvc/config.local" not in tracked and "config.local" in (ROOT / ".dvc/.gitignore").read_text()
