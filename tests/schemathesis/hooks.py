"""Schemathesis hooks for tests/test_schemathesis.py: every call carries a fresh client JWT, as an
EHR sends one (ES384, a new jti each time, aud = the URL called). Keys and URLs come from the test
through the environment."""
from __future__ import annotations

import os
import time
import uuid

import jwt
import schemathesis


@schemathesis.auth(refresh_interval=None)          # a new token for every call: a jti is single-use
class ClientJwt:
    def get(self, case, context):
        key = open(os.environ["ST_JWT_KEY"]).read()
        now = int(time.time())
        claims = {"iss": os.environ["ST_ISS"], "aud": os.environ["ST_BASE"] + case.formatted_path,
                  "exp": now + 300, "iat": now, "jti": str(uuid.uuid4())}
        return jwt.encode(claims, key, algorithm="ES384", headers={"kid": "ec-1"})

    def set(self, case, data, context):
        case.headers = case.headers or {}
        case.headers["Authorization"] = f"Bearer {data}"
