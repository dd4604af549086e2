"""openapi.yaml against the live server, as an API fuzzer sees it: a bounded, seeded schemathesis run
with every check, client JWTs on, and the spec-mandated 412 declared in tests/schemathesis/."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from .conftest import ROOT, LiveServer
from .test_auth import EC_KEY, ISS, JwksServer


def test_schemathesis_finds_no_disagreement(tmp_path):
    st = Path(sys.executable).parent / "schemathesis"
    assert st.exists() or shutil.which("schemathesis"), "schemathesis is a test dependency (make install-test)"
    jwks = JwksServer()
    key = tmp_path / "client.pem"
    key.write_bytes(EC_KEY.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption()))
    server = LiveServer(tmp_path / "live", env={
        "CDS_AUTH": "required", "CDS_TRUSTED_ISSUERS": json.dumps({ISS: jwks.base + "/jwks.json"}),
        "CDS_WORKERS": "2", "CDS_LOG_LEVEL": "WARNING",
        "CDS_FEEDBACK_PER_MINUTE": "1000000"})        # hundreds of generated feedback posts: no 429 in this run
    server.env["CDS_PUBLIC_BASE_URL"] = server.base
    server.start()
    try:
        env = {**os.environ, "SCHEMATHESIS_HOOKS": "tests.schemathesis.hooks", "PYTHONPATH": str(ROOT),
               "ST_JWT_KEY": str(key), "ST_ISS": ISS, "ST_BASE": server.base}
        out = subprocess.run([str(st) if st.exists() else "schemathesis", "--config-file",
                              str(ROOT / "tests/schemathesis/schemathesis.toml"), "run", str(ROOT / "openapi.yaml"),
                              "--url", server.base, "--checks", "all", "--max-examples", "25", "--seed", "20261201",
                              "--no-color"],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=420)
        summary = out.stdout[-6000:]
        assert out.returncode == 0, summary
        assert "API Operations" in summary and "generated" in summary
    finally:
        server.kill()
        jwks.httpd.shutdown()
