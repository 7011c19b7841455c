"""Fuzzing the latent explorer's API: over 2,000 generated requests, not one answered 5xx.

Hypothesis builds arbitrary JSON (NaN, Infinity, huge and tiny numbers, nesting, wrong types),
near-valid bodies (the right fields with wrong values), raw bytes, random paths and methods and
content types. Every answer must be below 500, and every refusal a JSON ``{"error": ...}``.
"""

from __future__ import annotations

import json
import math
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from synthetic import uniform_noise, write_synthetic  # noqa: E402
from vaelab.config import resolve_config  # noqa: E402
from vaelab.explore import create_app  # noqa: E402
from vaelab.training import train  # noqa: E402

FUZZ = settings(max_examples=300, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
RUNS = 2  # run 0: a VAE with latent 3; run 1: a CVAE with latent 2
LATENT = [3, 2]
CVAE = 1


def valid_z(z: object, dim: int) -> bool:
    return isinstance(z, list) and len(z) == dim and all(
        type(v) in (int, float) and math.isfinite(v) and abs(v) <= 10 for v in z)


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> TestClient:
    root = tmp_path_factory.mktemp("explore-fuzz")
    data = write_synthetic(root / "data", uniform_noise, 160, 40, seed=0)
    paths = []
    for name, model, latent in (("vae3", "vae", 3), ("cvae", "cvae", 2)):
        cfg = resolve_config("smoke", model=model, dataset=f"idx:{data}", val_size=32,
                             latent_dim=latent)
        train(cfg, root / name, progress=False)
        paths.append(root / name)
    with TestClient(create_app(paths), raise_server_exceptions=True) as c:
        yield c


def check(response, method: str) -> None:
    assert response.status_code < 500, (response.status_code, response.text[:300])
    if response.status_code >= 400 and method != "HEAD":
        assert response.headers["content-type"].startswith("application/json"), response.text
        error = response.json()["error"]
        assert isinstance(error, str) and error


# --------------------------------------------------------------------------------------------
# Strategies
# --------------------------------------------------------------------------------------------
numbers = st.one_of(
    st.integers(min_value=-12, max_value=12),
    st.integers(),  # arbitrarily large
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=-11, max_value=11),
    st.sampled_from([0, 1, -1, 10, -10, 10.0, 1e-320, -0.0, 2**53, 2**63, 2**64 + 1]),
)
scalars = st.one_of(st.none(), st.booleans(), numbers, st.text(max_size=4))
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.text(max_size=3), inner, max_size=3)),
    max_leaves=8,
)
vectors = st.one_of(
    st.lists(st.floats(-10, 10), min_size=2, max_size=3),  # often valid: reaches the models
    st.lists(numbers, min_size=0, max_size=5),
    json_values,
)
labels = st.one_of(st.integers(min_value=-2, max_value=12), st.integers(), scalars)


def mutated_image(fill: float, mode: str, r: int, c: int, value: object) -> object:
    """A valid 28 x 28 image with one defect: a cell, a row, or the row count changed."""
    image = [[fill] * 28 for _ in range(28)]
    if mode == "cell":
        image[r][c] = value
    elif mode == "row":
        image[r] = value
    elif mode == "short":
        image[r] = image[r][:c]
    elif mode == "long":
        image[r] = image[r] + [fill] * (c + 1)
    elif mode == "rows":
        image = image[:r] if c % 2 else image + [[fill] * 28] * (c + 1)
    return image


images = st.one_of(
    st.builds(mutated_image, st.floats(0, 1),
              st.sampled_from(["none", "cell", "cell", "row", "short", "long", "rows"]),
              st.integers(0, 27), st.integers(0, 27), scalars),
    json_values,
)
fields = {
    "z": vectors, "zs": st.one_of(st.lists(vectors, max_size=4), json_values),
    "y": labels, "ys": st.one_of(st.lists(labels, max_size=12), json_values),
    "image": images,
}
near_valid = st.fixed_dictionaries(
    {}, optional={**fields, "extra": json_values}
)
bodies = st.one_of(near_valid, json_values)
run_ids = st.one_of(st.sampled_from(["0", "1", "2", "-1", "01", "1.0", "999999999999999999999"]),
                    st.text(min_size=1, max_size=6))
endpoints = st.sampled_from(["decode", "decode_batch", "encode", "points", "test_image/3",
                             "test_image/40", "test_image/-1", "", "nope"])
methods = st.sampled_from(["GET", "POST", "POST", "POST", "PUT", "DELETE", "PATCH", "HEAD",
                           "OPTIONS"])
framings = st.sampled_from([  # body-framing headers, as a client (or a smuggler) may send
    {}, {}, {}, {"transfer-encoding": "chunked"}, {"content-length": "0"},
    {"content-length": "99999999999999"}, {"content-length": "abc"}, {"content-length": "-1"},
    {"content-length": "3", "transfer-encoding": "chunked"},
    {"Content-Length": "3", "Transfer-Encoding": "gzip, chunked"},
])
content_types = st.sampled_from(["application/json", "application/json; charset=utf-8",
                                 "APPLICATION/JSON", "text/plain", "", None,
                                 "multipart/form-data; boundary=x", "application/json;;"])


def api_path(run: str, endpoint: str) -> str:
    return "/api/runs/" + quote(run, safe="") + ("/" + endpoint if endpoint else "")


def dumps(value: object) -> bytes:
    # allow_nan: Python's json writes NaN and Infinity literals, which the server must refuse
    return json.dumps(value, allow_nan=True).encode()


# --------------------------------------------------------------------------------------------
# Properties
# --------------------------------------------------------------------------------------------
@settings(FUZZ, max_examples=200)
@given(body=near_valid)
def test_near_valid_bodies(client: TestClient, body: dict) -> None:
    """Each body goes to every model endpoint of both runs (six requests)."""
    raw = dumps(body)
    for run in range(RUNS):
        for endpoint in ("decode", "decode_batch", "encode"):
            r = client.post(api_path(str(run), endpoint), content=raw,
                            headers={"content-type": "application/json"})
            check(r, "POST")
            if r.status_code == 200 and endpoint == "decode":  # only a valid request passes
                assert valid_z(body["z"], LATENT[run]), body
                if run == CVAE:
                    assert type(body["y"]) is int and 0 <= body["y"] <= 9, body
                else:
                    assert "y" not in body, body


@settings(FUZZ, max_examples=2000)  # the bar for each surface: 2,000 examples
@given(run=run_ids, endpoint=endpoints, method=methods, body=bodies, ctype=content_types,
       framing=framings)
def test_any_json_anywhere(client: TestClient, run: str, endpoint: str, method: str,
                           body: object, ctype: str | None, framing: dict[str, str]) -> None:
    headers = {**({} if ctype is None else {"content-type": ctype}), **framing}
    r = client.request(method, api_path(run, endpoint), content=dumps(body), headers=headers)
    check(r, method)
    if len(framing) == 2:  # both Content-Length and Transfer-Encoding: refused, whatever else
        assert r.status_code == 400 and r.headers["connection"] == "close", r.text


@settings(FUZZ, max_examples=200)
@given(raw=st.one_of(st.binary(max_size=300),
                     st.text(max_size=200).map(str.encode),
                     st.text(alphabet='{}[]":,.-+eE0123456789 aNInfinityulltrsz', max_size=120)
                     .map(str.encode)))
def test_raw_bodies(client: TestClient, raw: bytes) -> None:
    for run in range(RUNS):
        for endpoint in ("decode", "decode_batch", "encode"):
            r = client.post(api_path(str(run), endpoint), content=raw,
                            headers={"content-type": "application/json"})
            check(r, "POST")


@FUZZ
@given(path=st.one_of(
    st.text(max_size=40).map(lambda t: "/" + quote(t, safe="/%.?&=")),
    st.lists(st.sampled_from(["static", "api", "runs", "0", "1", "..", ".", "%2e%2e", "%2f",
                              "app.js", "style.css", "index.html", "server.py", "",
                              "test_image", "points", "%00", "~", "\\"]),
             max_size=6).map(lambda parts: "/" + "/".join(parts)),
), method=st.sampled_from(["GET", "HEAD", "POST", "OPTIONS"]))
def test_random_paths(client: TestClient, path: str, method: str) -> None:
    try:
        r = client.request(method, "http://testserver" + path, content=b"{}",
                           headers={"content-type": "application/json"})
    except Exception as e:  # a URL the client itself will not send is no test of the server
        assume(type(e).__name__ != "InvalidURL")
        raise
    check(r, method)
    if r.status_code == 200 and method == "GET":
        # only the page, its assets and the API ever answer
        ctype = r.headers["content-type"]
        assert ctype.startswith(("text/html", "text/css", "text/javascript",
                                 "application/json")), (path, ctype)
        assert "def create_app" not in r.text
