"""Every command the READMEs show is run here, as written (a newcomer copies them), so none of them rots.

A block is a fenced ```sh block of README.md, cards/README.md or docs/. Its commands run from the project root
in bash. What may change, and only that: a server's port (a free one instead of 8080/8081/8082), its data
folder (a temporary one), PostgreSQL (a throw-away server), the dev corpus for score.py (six of its patients,
so the suite stays fast), and `make` targets, which are dry-run (`make -n`: `make test` cannot run itself).
A block of any other kind fails the test until it is given a way to run here."""
from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ROOT, _wait_http, free_port

DOCS = [ROOT / "README.md", ROOT / "cards" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHARED = ROOT.parent / "shared"
BIN = ROOT / ".venv" / "bin"


def sh_blocks(path: Path) -> list[list[str]]:
    """The fenced sh blocks of a Markdown file, each as its commands (continuations joined, comments cut)."""
    blocks, current = [], None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if current is None:
            if line == "```sh":
                current = []
            continue
        if line == "```":
            blocks.append(_commands(current))
            current = None
            continue
        current.append(line)
    return blocks


def _commands(lines: list[str]) -> list[str]:
    out, pending = [], ""
    for line in lines:
        line = re.sub(r"\s+#\s.*$", "", line) if not line.startswith("#") else ""
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        if pending + line:
            out.append((pending + line).strip())
        pending = ""
    return out


ALL_BLOCKS = [(p, i, b) for p in DOCS for i, b in enumerate(sh_blocks(p)) if b]


def kind(block: list[str]) -> str:
    first = block[0]
    if all(c.startswith("make ") for c in block):
        return "make"
    if first.startswith("curl "):
        return "curl"
    if any(re.search(r"cds-service serve\b", c) for c in block):
        return "server"
    if all(c.startswith("python3 ../shared/dev-corpus/score.py") for c in block):
        return "score"
    if all(c.startswith(".venv/bin/cds-service ") or c.startswith(".venv/bin/python ") for c in block):
        return "cli"
    return "unknown"


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CDS_")}
    return env | {"CDS_AS_OF": "2026-06-30"} | extra


def _bash(script: str, env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_every_block_has_a_way_to_run():
    assert ALL_BLOCKS, "no sh blocks found"
    unknown = [(p.relative_to(ROOT), b) for p, _, b in ALL_BLOCKS if kind(b) == "unknown"]
    assert not unknown, f"README commands no test runs: {unknown}"
    kinds = {kind(b) for _, _, b in ALL_BLOCKS}
    assert {"make", "curl", "server", "cli", "score"} <= kinds


@pytest.mark.parametrize("block", [b for _, _, b in ALL_BLOCKS if kind(b) == "make"], ids=" ; ".join)
def test_make_targets_exist(block):
    for command in block:
        done = subprocess.run(["make", "-n", *command.split()[1:]], cwd=ROOT, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("block", [b for _, _, b in ALL_BLOCKS if kind(b) == "cli"], ids=" ; ".join)
def test_cli_commands_run_as_written(block):
    for command in block:
        done = _bash(command, _env())
        assert done.returncode == 0, (command, done.stderr[-2000:])
        assert (done.stdout + done.stderr).strip(), command          # every command says what it did


@pytest.mark.parametrize("block", [b for _, _, b in ALL_BLOCKS if kind(b) == "score"], ids=" ; ".join)
def test_corpus_score_commands_run(block, tmp_path):
    corpus = SHARED / "dev-corpus"
    if not corpus.is_dir():
        pytest.fail("../shared/dev-corpus is needed beside the project")
    for command in block:
        src = corpus / "messy" if "--corpus ../shared/dev-corpus/messy" in command else corpus
        sample = tmp_path / src.name
        (sample / "data").mkdir(parents=True)
        with open(src / "labels.csv", newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            rows, fields = list(reader)[:6], reader.fieldnames
        with open(sample / "labels.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)
        for row in rows:
            shutil.copy(src / row["file"], sample / row["file"])
        cmd = re.sub(r" --corpus \S+", "", command) + f" --corpus {sample}"
        done = _bash(cmd, _env(), timeout=300)
        assert done.returncode == 0, (cmd, done.stderr[-2000:])
        assert re.search(r"sensitivity \d\.\d{3}", done.stdout), done.stdout[-1000:]


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory):
    """`make run`, as the quick start starts it (authentication off, CORS *), with the fixtures' date."""
    port = free_port()
    proc = subprocess.Popen([str(BIN / "cds-service"), "serve", "--port", str(port), "--workers", "1"], cwd=ROOT,
                            env=_env(CDS_AUTH="off", CDS_CORS_ORIGINS="*",
                                     CDS_DATA_DIR=str(tmp_path_factory.mktemp("data"))),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    _wait_http(f"http://127.0.0.1:{port}/healthz", proc, timeout=30)
    yield port
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=20)


@pytest.mark.integration
@pytest.mark.parametrize("block", [b for _, _, b in ALL_BLOCKS if kind(b) == "curl"], ids=" ; ".join)
def test_curl_examples_answer(block, demo_server):
    for command in block:
        done = _bash(command.replace("127.0.0.1:8080", f"127.0.0.1:{demo_server}") + " --fail-with-body", _env())
        assert done.returncode == 0, (command, done.stdout[-1000:], done.stderr[-1000:])
        answer = json.loads(done.stdout)
        if "/cds-services/" in command:
            assert answer["cards"], command              # the README promises a card for each example
            assert answer["cards"][0]["summary"]
        else:
            assert len(answer["services"]) == 3


@pytest.mark.integration
@pytest.mark.parametrize("block", [b for _, _, b in ALL_BLOCKS if kind(b) == "server"], ids=" ; ".join)
def test_server_examples_start(block, tmp_path, postgres):
    """The production and replica examples start and become ready (with a throw-away PostgreSQL, temporary
    data folders and free ports in place of the example's own)."""
    ports = {p: str(free_port()) for p in ("8081", "8082")}
    script = "\n".join(block)
    if "postgresql://" in script:
        script = re.sub(r"postgresql://\S+", postgres.new_database(), script)
    script = script.replace("/var/lib/cds", str(tmp_path))
    for old, new in ports.items():
        script = script.replace(f"--port {old}", f"--port {new}")
    own_port = str(free_port())             # a serve command that names no port: CDS_PORT
    serving = [ports[p] for p in ports if f"--port {ports[p]}" in script] or [own_port]
    script = f"set -e\n{script}\n" + ("wait\n" if "&" in script else "")
    proc = subprocess.Popen(["bash", "-c", script], cwd=ROOT, env=_env(CDS_PORT=own_port, CDS_WORKERS="1"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        for port in serving:
            _wait_http(f"http://127.0.0.1:{port}/readyz", proc, timeout=30)
    except RuntimeError:
        os.killpg(proc.pid, signal.SIGTERM)
        raise AssertionError(proc.communicate(timeout=20)[1][-2000:]) from None
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=30)


def test_the_fixture_request_is_what_cds_service_request_writes():
    """fixtures/requests/ is written by `cds-service request`; the README POSTs it, so it must stay current."""
    written = ROOT / "fixtures" / "requests" / "patient-view-glucocorticoids.json"
    done = subprocess.run([sys.executable, "-m", "cds_service.cli", "request",
                           str(ROOT / "fixtures" / "patients" / "glucocorticoids-positive.json")],
                          cwd=ROOT, capture_output=True, text=True, env=_env())
    assert done.returncode == 0, done.stderr
    fresh, kept = json.loads(done.stdout), json.loads(written.read_text())
    fresh.pop("hookInstance"), kept.pop("hookInstance")
    assert fresh == kept
