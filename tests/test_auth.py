"""Client JWT authentication (CDS Hooks 2.0 "Trusting CDS Clients"), each failure a bare 401."""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from cds_service import create_app
from cds_service.config import Settings

from .conftest import AS_OF, ROOT, SERVICE_URL, fixture_request, issue_cards

ISS = "https://ehr.test"
BASE = "https://cds.test"
EC_KEY = ec.generate_private_key(ec.SECP384R1())
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
OTHER_EC = ec.generate_private_key(ec.SECP384R1())


def jwk(private, kid: str, alg: str) -> dict:
    d = json.loads(jwt.algorithms.get_default_algorithms()[alg].to_jwk(private.public_key()))
    return {**d, "kid": kid, "alg": alg, "use": "sig"}


class JwksServer:
    def __init__(self):
        self.fetches: list[str] = []
        self.keys = {"/jwks.json": [jwk(EC_KEY, "ec-1", "ES384"), jwk(RSA_KEY, "rsa-1", "RS384")],
                     "/rotated.json": [jwk(EC_KEY, "ec-1", "ES384")],
                     "/evil.json": [jwk(OTHER_EC, "ec-1", "ES384")]}
        outer = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                outer.fetches.append(self.path)
                data = json.dumps({"keys": outer.keys.get(self.path, [])}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture
def jwks():
    server = JwksServer()
    yield server
    server.httpd.shutdown()
    server.httpd.server_close()


@pytest.fixture
def auth_client(tmp_path, jwks):
    trusted = {ISS: [jwks.base + "/jwks.json", jwks.base + "/rotated.json"]}
    app = create_app(Settings(cors_origins="*", data_dir=str(tmp_path), as_of=AS_OF.isoformat(), auth="required",
                              trusted_issuers=json.dumps(trusted), public_base_url=BASE, log_level="WARNING"))
    return app.test_client()


def token(key=EC_KEY, alg="ES384", kid="ec-1", headers=None, **claims) -> str:
    now = int(time.time())
    payload = {"iss": ISS, "aud": BASE + SERVICE_URL, "exp": now + 300, "iat": now, "jti": str(uuid.uuid4())}
    payload.update(claims)
    payload = {k: v for k, v in payload.items() if v is not None}
    hdr = {"kid": kid, "typ": "JWT", **(headers or {})}
    return jwt.encode(payload, key, algorithm=alg, headers=hdr)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hand_made(header: dict, payload: dict, signature: bytes = b"") -> str:
    return f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}.{b64(signature)}"


def call(client, tok: str | None, path=SERVICE_URL, body=None):
    headers = {"Authorization": f"Bearer {tok}"} if tok is not None else {}
    if path.endswith("/cds-services"):
        return client.get(path, headers=headers)
    return client.post(path, json=body or fixture_request("patients/rheumatoid_arthritis-positive.json"), headers=headers)


def assert_401(resp):
    assert resp.status_code == 401
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    body = resp.get_json()
    assert body["resourceType"] == "OperationOutcome" and body["issue"][0]["diagnostics"] == "Authentication failed."


def test_valid_es384(auth_client):
    assert call(auth_client, token()).status_code == 200


def test_valid_rs384(auth_client):
    assert call(auth_client, token(RSA_KEY, "RS384", "rsa-1")).status_code == 200


def test_aud_as_an_array(auth_client):
    assert call(auth_client, token(aud=["https://other.test", BASE + SERVICE_URL])).status_code == 200


def test_discovery_and_feedback_use_their_own_url_as_aud(auth_client):
    assert call(auth_client, token(aud=BASE + "/cds-services"), path="/cds-services").status_code == 200
    fb = {"feedback": [{"card": "c1", "outcome": "overridden", "outcomeTimestamp": "2026-06-30T10:00:00Z"}]}
    issue_cards(auth_client.application, "c1")
    assert call(auth_client, token(aud=BASE + SERVICE_URL + "/feedback"), path=SERVICE_URL + "/feedback", body=fb).status_code == 200


def test_missing_header(auth_client):
    assert_401(call(auth_client, None))
    assert_401(auth_client.post(SERVICE_URL, json={}, headers={"Authorization": "Basic dXNlcjpwYXNz"}))


def test_malformed(auth_client):
    assert_401(call(auth_client, "not.a.jwt"))
    assert_401(call(auth_client, "x"))


def test_bad_signature(auth_client):
    assert_401(call(auth_client, token(key=OTHER_EC)))                 # right kid, wrong key


def test_alg_none(auth_client):
    now = int(time.time())
    tok = hand_made({"alg": "none", "typ": "JWT", "kid": "ec-1"},
                    {"iss": ISS, "aud": BASE + SERVICE_URL, "exp": now + 300, "iat": now, "jti": "n1"})
    assert_401(call(auth_client, tok))


def test_hs256_with_the_public_key_as_secret(auth_client):
    now = int(time.time())
    header = {"alg": "HS256", "typ": "JWT", "kid": "ec-1"}
    payload = {"iss": ISS, "aud": BASE + SERVICE_URL, "exp": now + 300, "iat": now, "jti": "h1"}
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}".encode()
    pem = EC_KEY.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    sig = hmac.new(pem, signing_input, hashlib.sha256).digest()
    assert_401(call(auth_client, signing_input.decode() + "." + b64(sig)))


def test_expired(auth_client):
    now = int(time.time())
    assert_401(call(auth_client, token(exp=now - 600, iat=now - 900)))


def test_future_iat(auth_client):
    assert_401(call(auth_client, token(iat=int(time.time()) + 600, exp=int(time.time()) + 900)))


def test_wrong_aud(auth_client):
    assert_401(call(auth_client, token(aud=BASE + "/cds-services")))        # discovery URL on a service call
    assert_401(call(auth_client, token(aud="https://elsewhere.test" + SERVICE_URL)))


def test_replayed_jti(auth_client):
    tok = token()
    assert call(auth_client, tok).status_code == 200
    assert_401(call(auth_client, tok))


def test_unknown_kid_refreshes_the_jwks_then_fails(auth_client, jwks):
    auth_client.application.extensions["cds"]["authenticator"].jwks_refresh_cooldown = 0
    assert call(auth_client, token()).status_code == 200
    before = len(jwks.fetches)
    assert_401(call(auth_client, token(kid="never-published")))
    assert len(jwks.fetches) - before == 1                             # one refetch, then refused


def test_unknown_kids_cannot_flood_the_issuer(auth_client, jwks):
    assert call(auth_client, token()).status_code == 200               # fetch starts the 30 s cooldown
    before = len(jwks.fetches)
    for n in range(5):
        assert_401(call(auth_client, token(kid=f"forged-{n}")))
    assert len(jwks.fetches) == before


def test_jwks_is_cached(auth_client, jwks):
    for _ in range(3):
        assert call(auth_client, token()).status_code == 200
    assert jwks.fetches.count("/jwks.json") == 1


def test_jku_off_the_allowlist_is_refused_and_never_fetched(auth_client, jwks):
    evil = jwks.base + "/evil.json"
    assert_401(call(auth_client, token(key=OTHER_EC, headers={"jku": evil})))
    assert "/evil.json" not in jwks.fetches


def test_jku_on_the_allowlist_is_used(auth_client, jwks):
    assert call(auth_client, token(headers={"jku": jwks.base + "/rotated.json"})).status_code == 200
    assert "/rotated.json" in jwks.fetches


@pytest.mark.parametrize("claims", [dict(iss="https://untrusted.test"), dict(jti=None), dict(exp=None), dict(iat=None)])
def test_untrusted_issuer_and_missing_claims(auth_client, claims):
    assert_401(call(auth_client, token(**claims)))


def test_header_rules(auth_client):
    assert_401(call(auth_client, token(headers={"typ": "at+jwt"})))
    assert_401(call(auth_client, jwt.encode({"iss": ISS}, EC_KEY, algorithm="ES384")))   # no kid
    assert_401(call(auth_client, token(key=ec.generate_private_key(ec.SECP256R1()), alg="ES256")))


def test_preflight_and_health_need_no_token(auth_client):
    assert auth_client.options(SERVICE_URL, headers={"Origin": "https://sandbox.cds-hooks.org",
                                                     "Access-Control-Request-Method": "POST"}).status_code == 204
    assert auth_client.get("/healthz").status_code == 200


def test_401_carries_cors_headers(auth_client):
    resp = auth_client.get("/cds-services", headers={"Origin": "https://sandbox.cds-hooks.org"})
    assert_401(resp)
    assert resp.headers["Access-Control-Allow-Origin"]


def test_required_auth_without_trusted_issuers_refuses_to_start(tmp_path):
    with pytest.raises(ValueError, match="CDS_TRUSTED_ISSUERS"):
        create_app(Settings(cors_origins="*", data_dir=str(tmp_path), auth="required"))


def test_authentication_is_required_by_default_even_on_loopback():
    """The usual reverse proxy on the same host: binding to 127.0.0.1 must not switch authentication off."""
    assert Settings.from_env({"CDS_HOST": "127.0.0.1"}).auth_required is True
    assert Settings.from_env({"CDS_HOST": "127.0.0.1", "CDS_AUTH": "off"}).auth_required is False


@pytest.mark.parametrize("env, says", [
    ({"CDS_AUTH": "auto"}, "CDS_AUTH=auto is gone"),
    ({"CDS_AUTH": "off", "CDS_TRUSTED_ISSUERS": json.dumps({ISS: "https://ehr.test/jwks.json"})}, "production"),
    ({"CDS_AUTH": "off", "CDS_PUBLIC_BASE_URL": "https://cds.example.org"}, "production"),
])
def test_authentication_cannot_be_switched_off_beside_a_production_configuration(env, says):
    with pytest.raises(ValueError, match=says):
        Settings.from_env(env)


def test_a_token_living_longer_than_five_minutes_is_refused(auth_client):
    now = int(time.time())
    assert_401(call(auth_client, token(iat=now, exp=now + 74 * 365 * 86400)))      # 74 years
    assert_401(call(auth_client, token(iat=now, exp=now + 3600)))
    assert call(auth_client, token(iat=now, exp=now + 300)).status_code == 200


def test_cors_answers_only_the_configured_origins(tmp_path):
    from cds_service import create_app as make
    app = make(Settings(auth="off", data_dir=str(tmp_path)))                        # no CDS_CORS_ORIGINS
    resp = app.test_client().options(SERVICE_URL, headers={"Origin": "https://evil.example",
                                                            "Access-Control-Request-Method": "POST",
                                                            "Access-Control-Request-Private-Network": "true"})
    assert "Access-Control-Allow-Origin" not in resp.headers
    assert "Access-Control-Allow-Private-Network" not in resp.headers


def test_a_token_replayed_to_another_replica_is_refused(tmp_path, jwks, postgres):
    """Two service instances on one PostgreSQL database: the replay cache is shared."""
    url = postgres.new_database()
    trusted = json.dumps({ISS: [jwks.base + "/jwks.json"]})
    replicas = [create_app(Settings(cors_origins="*", data_dir=str(tmp_path / f"replica{n}"), as_of=AS_OF.isoformat(), auth="required",
                                    trusted_issuers=trusted, public_base_url=BASE, database_url=url,
                                    log_level="WARNING")).test_client() for n in (1, 2)]
    t = token()
    headers = {"Authorization": f"Bearer {t}"}
    body = fixture_request("patients/rheumatoid_arthritis-positive.json")
    assert replicas[0].post(SERVICE_URL, json=body, headers=headers).status_code == 200
    assert replicas[1].post(SERVICE_URL, json=body, headers=headers).status_code == 401
    assert replicas[0].post(SERVICE_URL, json=body, headers=headers).status_code == 401
    fresh = {"Authorization": f"Bearer {token()}"}
    assert replicas[1].post(SERVICE_URL, json=body, headers=fresh).status_code == 200


def test_a_url_called_with_a_double_slash_is_its_own_aud(auth_client):
    path = "/cds-services//secondary-osteoporosis"
    assert call(auth_client, token(aud=BASE + path), path=path).status_code == 200
    assert call(auth_client, token(aud=BASE + SERVICE_URL), path=path).status_code == 200
    assert call(auth_client, token(aud=BASE + "/cds-services/other"), path=path).status_code == 401


# ---- pinned keys: a local copy of an issuer's JWKS (issue 14, point 2) --------------------------
SANDBOX_JKU = "https://sandbox.cds-hooks.org/.well-known/jwks.json"


def pinned_client(tmp_path, jwks_value, jku=(SANDBOX_JKU,)):
    trusted = {ISS: {"jwks": jwks_value, "jku": list(jku)}}
    app = create_app(Settings(cors_origins="*", data_dir=str(tmp_path), as_of=AS_OF.isoformat(), auth="required",
                              trusted_issuers=json.dumps(trusted), public_base_url=BASE, log_level="WARNING"))
    return app.test_client()


def test_pinned_keys_from_a_file_accept_the_jku_the_issuer_sends_and_never_fetch_it(tmp_path):
    """The sandbox always sends its public jku; an offline deployment maps it to a local JWKS copy."""
    path = tmp_path / "issuer-jwks.json"
    path.write_text(json.dumps({"keys": [jwk(EC_KEY, "ec-1", "ES384")]}))
    client = pinned_client(tmp_path, str(path))
    assert call(client, token(headers={"jku": SANDBOX_JKU})).status_code == 200
    assert call(client, token()).status_code == 200                          # no jku: the pinned keys
    assert_401(call(client, token(headers={"jku": "https://evil.example/jwks.json"})))
    assert_401(call(client, token(key=OTHER_EC, headers={"jku": SANDBOX_JKU})))     # not the pinned key
    assert_401(call(client, token(kid="other", headers={"jku": SANDBOX_JKU})))


def test_pinned_keys_inline_or_from_a_url_of_the_deployments_choosing(tmp_path, jwks):
    inline = pinned_client(tmp_path / "a", {"keys": [jwk(EC_KEY, "ec-1", "ES384")]})
    assert call(inline, token(headers={"jku": SANDBOX_JKU})).status_code == 200
    mirrored = pinned_client(tmp_path / "b", "file://" + str(ROOT / ".." / "shared" / "cds-hooks-sandbox" /
                                                            ".well-known" / "jwks.json"))
    assert_401(call(mirrored, token(headers={"jku": SANDBOX_JKU})))          # the sandbox's key, not ours
    local = pinned_client(tmp_path / "c", jwks.base + "/rotated.json")
    assert call(local, token(headers={"jku": SANDBOX_JKU})).status_code == 200
    assert jwks.fetches == ["/rotated.json"]                                  # the pinned URL, never the jku


@pytest.mark.parametrize("value, message", [
    ({"jwks": "/no/such/file.json"}, "cannot read a JWKS"),
    ({"jwks": {"keys": "nope"}}, "not a usable JWKS"),
    ({"jku": [SANDBOX_JKU]}, "must be"),
    ({"jwks": {"keys": []}, "jku": 7}, "jku must be"),
    ({"jwks": {"keys": []}, "other": 1}, "must be"),
])
def test_a_pinned_issuer_that_cannot_be_used_refuses_to_start(tmp_path, value, message):
    from cds_service.web.auth import parse_trusted_issuers
    with pytest.raises(ValueError, match=message):
        parse_trusted_issuers(json.dumps({ISS: value}))
