"""Keys and algorithms: RS256/ES256 from a JWKS file, iss/aud, claim names, and every confusion refused."""

from __future__ import annotations

import json
import time

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from tornado.httpclient import HTTPClientError

from tests.support import SECRET, Client, http, json_of, make_token


def pem_public(private_key) -> bytes:
    return private_key.public_key().public_bytes(serialization.Encoding.PEM,
                                                 serialization.PublicFormat.SubjectPublicKeyInfo)


RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
OTHER_RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())


def signed(key, algorithm: str, kid: str | None = None, **claims) -> str:
    payload = {"sub": "alice", "empresaId": "acme", "iss": "https://auth.example", "aud": "eddy",
               "exp": int(time.time()) + 600, **claims}
    return jwt.encode(payload, key, algorithm=algorithm, headers={"kid": kid} if kid else None)


@pytest.fixture
def asymmetric_settings(settings, tmp_path):
    jwks = {"keys": [
        {**json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(RSA_KEY.public_key())), "kid": "rsa-1", "alg": "RS256"},
        {**json.loads(jwt.algorithms.ECAlgorithm.to_jwk(EC_KEY.public_key())), "kid": "ec-1", "alg": "ES256"},
    ]}
    (tmp_path / "jwks.json").write_text(json.dumps(jwks))
    return settings.with_changes(jwt_algorithms="RS256,ES256", jwks_file=str(tmp_path / "jwks.json"),
                                 jwt_issuer="https://auth.example", jwt_audience="eddy", tenant_claim="empresaId")


@pytest.fixture
def eddy(asymmetric_settings, io_loop):
    from service.app import Eddy

    service = Eddy(asymmetric_settings)
    io_loop.run_sync(service.start)
    yield service
    io_loop.run_sync(service.stop)


@pytest.mark.gen_test
async def test_rs256_and_es256_from_jwks_with_custom_claims(http_server, http_port):
    for token in (signed(RSA_KEY, "RS256", "rsa-1"), signed(EC_KEY, "ES256", "ec-1")):
        client = await Client.connect(http_port, "/ws", token)
        connected = await client.recv()
        assert (connected["user_id"], connected["tenant"]) == ("alice", "acme")
        client.close()


@pytest.mark.gen_test
@pytest.mark.parametrize("case", ["alg-none", "wrong-key", "hs-rs-confusion", "wrong-audience", "wrong-issuer",
                                  "unknown-kid", "hs256-not-accepted"])
async def test_refused_at_the_handshake(http_server, http_port, case):
    public_pem = pem_public(RSA_KEY)
    token = {
        "alg-none": lambda: jwt.encode({"sub": "alice", "empresaId": "acme", "iss": "https://auth.example",
                                        "aud": "eddy"}, None, algorithm="none"),
        "wrong-key": lambda: signed(OTHER_RSA_KEY, "RS256", "rsa-1"),
        # HMAC-signed with the server's own public key, claiming HS256.
        "hs-rs-confusion": lambda: _hmac_with(public_pem),
        "wrong-audience": lambda: signed(RSA_KEY, "RS256", "rsa-1", aud="another-service"),
        "wrong-issuer": lambda: signed(RSA_KEY, "RS256", "rsa-1", iss="https://evil.example"),
        "unknown-kid": lambda: signed(RSA_KEY, "RS256", "rsa-9"),
        "hs256-not-accepted": lambda: make_token(secret=SECRET),
    }[case]()
    with pytest.raises(HTTPClientError) as refused:
        await Client.connect(http_port, "/ws", token)
    assert refused.value.code == 401
    response = await http(http_port, "GET", "/api/channels/c/events", token=token)
    assert response.code == 401 and json_of(response)["code"] == "TOKEN_INVALID"


def _hmac_with(secret: bytes) -> str:
    import base64
    import hashlib
    import hmac

    def b64(data: bytes) -> bytes:
        return base64.urlsafe_b64encode(data).rstrip(b"=")

    header = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    payload = b64(json.dumps({"sub": "alice", "empresaId": "acme", "iss": "https://auth.example", "aud": "eddy",
                              "exp": int(time.time()) + 600}).encode())
    signature = b64(hmac.new(secret, header + b"." + payload, hashlib.sha256).digest())
    return (header + b"." + payload + b"." + signature).decode()
