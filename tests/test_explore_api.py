"""The latent explorer's JSON API, in-process (Starlette's TestClient), over three tiny runs.

Every endpoint answers what the models compute; every kind of bad input gets a 4xx with a JSON
``{"error": ...}`` (never a 500); the page and its two assets are served and nothing else.
"""

from __future__ import annotations

import base64
import json
import math
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
import uvicorn  # noqa: F401 - the [test] extra: a missing one fails, never skips
from starlette.testclient import TestClient

from synthetic import ring_blobs, write_synthetic  # noqa: E402
from vaelab.checkpoint import load_run, save_final  # noqa: E402
from vaelab.cli import main  # noqa: E402
from vaelab.config import resolve_config  # noqa: E402
from vaelab.data import load_dataset  # noqa: E402
from vaelab.explore import MAX_BATCH, MAX_BODY, create_app  # noqa: E402
from vaelab.training import train  # noqa: E402

N_TEST = 120


@pytest.fixture(scope="session")
def explore_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("explore-api")
    data = write_synthetic(root / "data", ring_blobs, 400, N_TEST, seed=0)
    runs = {}
    for name, model, latent in (("vae", "vae", 2), ("cvae", "cvae", 2), ("vae3", "vae", 3)):
        cfg = resolve_config("smoke", model=model, dataset=f"idx:{data}", val_size=32,
                             latent_dim=latent)
        train(cfg, root / name, progress=False)
        runs[name] = root / name
    return runs


@pytest.fixture(scope="module")
def client(explore_runs: dict[str, Path]) -> TestClient:
    app = create_app([explore_runs["vae"], explore_runs["cvae"], explore_runs["vae3"]])
    with TestClient(app) as c:
        yield c


@pytest.fixture(scope="module")
def models(explore_runs: dict[str, Path]) -> list[torch.nn.Module]:
    return [load_run(explore_runs[n]).model for n in ("vae", "cvae", "vae3")]


def pixels(b64: str) -> np.ndarray:
    raw = base64.b64decode(b64, validate=True)
    assert len(raw) == 28 * 28
    return np.frombuffer(raw, dtype=np.uint8).reshape(28, 28)


def expected(model: torch.nn.Module, z: list[list[float]], y: list[int] | None) -> np.ndarray:
    with torch.inference_mode():
        yt = None if y is None else torch.tensor(y)
        probs = torch.sigmoid(model.decode(torch.tensor(z), yt)).squeeze(1)
    return (probs * 255).round().to(torch.uint8).numpy()


def post(client: TestClient, path: str, body: object) -> dict:
    r = client.post(path, json=body)
    assert r.status_code == 200, r.text
    return r.json()


# --------------------------------------------------------------------------------------------
# Every endpoint works
# --------------------------------------------------------------------------------------------
def test_runs_describe_each_run(client: TestClient) -> None:
    data = client.get("/api/runs").json()
    runs = data["runs"]
    assert [(r["kind"], r["conditional"], r["latent_dim"]) for r in runs] == [
        ("vae", False, 2), ("cvae", True, 2), ("vae", False, 3)]
    assert all(r["test_size"] == N_TEST and r["data_error"] is None for r in runs)
    assert all(r["num_classes"] == 10 and r["image_size"] == 28 for r in runs)
    assert data["limits"]["z_bound"] == 10 and data["limits"]["max_batch"] == MAX_BATCH
    assert client.get("/api/runs/1").json() == runs[1]


@pytest.mark.parametrize("i", [0, 1, 2])
def test_points_are_the_posterior_means(client: TestClient, models: list, i: int) -> None:
    pts = client.get(f"/api/runs/{i}/points").json()
    ds = load_dataset(client.get(f"/api/runs/{i}").json()["dataset"], val_size=32, limit=512)
    assert pts["n"] == N_TEST and pts["test_size"] == N_TEST
    assert pts["labels"] == ds.test.labels.tolist()
    mu = np.array(pts["mu"])
    assert mu.shape == (N_TEST, models[i].latent_dim)
    x = ds.test.images.float().div(255).unsqueeze(1)
    with torch.inference_mode():
        want = models[i].encode(x, ds.test.labels if models[i].conditional else None)[0]
    np.testing.assert_allclose(mu, want.numpy(), atol=1e-3)


def test_decode_vae(client: TestClient, models: list) -> None:
    a = pixels(post(client, "/api/runs/0/decode", {"z": [0.5, -1]})["image"])
    np.testing.assert_array_equal(a, expected(models[0], [[0.5, -1.0]], None)[0])
    b = pixels(post(client, "/api/runs/0/decode", {"z": [-3, 3]})["image"])
    assert not np.array_equal(a, b)
    edge = post(client, "/api/runs/0/decode", {"z": [10, -10.0]})  # the bound itself is fine
    assert pixels(edge["image"]).shape == (28, 28)


def test_decode_cvae_and_latent3(client: TestClient, models: list) -> None:
    a = pixels(post(client, "/api/runs/1/decode", {"z": [0.2, 0.1], "y": 3})["image"])
    np.testing.assert_array_equal(a, expected(models[1], [[0.2, 0.1]], [3])[0])
    c = pixels(post(client, "/api/runs/2/decode", {"z": [0.2, 0.1, -2]})["image"])
    np.testing.assert_array_equal(c, expected(models[2], [[0.2, 0.1, -2.0]], None)[0])


def test_decode_batch_forms(client: TestClient, models: list) -> None:
    zs = [[-1.0, 0.0], [0.0, 0.0], [1.0, 2.5]]
    got = post(client, "/api/runs/0/decode_batch", {"zs": zs})["images"]
    np.testing.assert_array_equal(np.stack([pixels(g) for g in got]),
                                  expected(models[0], zs, None))
    # a CVAE: one class for every row, one z under every class, or pairs
    got = post(client, "/api/runs/1/decode_batch", {"zs": zs, "y": 4})["images"]
    np.testing.assert_array_equal(np.stack([pixels(g) for g in got]),
                                  expected(models[1], zs, [4, 4, 4]))
    got = post(client, "/api/runs/1/decode_batch", {"z": [0.3, -0.3], "ys": list(range(10))})
    np.testing.assert_array_equal(np.stack([pixels(g) for g in got["images"]]),
                                  expected(models[1], [[0.3, -0.3]] * 10, list(range(10))))
    got = post(client, "/api/runs/1/decode_batch", {"zs": zs, "ys": [0, 5, 9]})["images"]
    np.testing.assert_array_equal(np.stack([pixels(g) for g in got]),
                                  expected(models[1], zs, [0, 5, 9]))
    full = post(client, "/api/runs/2/decode_batch", {"zs": [[0.0, 0.0, 0.0]] * MAX_BATCH})
    assert len(full["images"]) == MAX_BATCH


def test_encode_and_test_image(client: TestClient, models: list) -> None:
    ti = client.get("/api/runs/1/test_image/7").json()
    assert ti["index"] == 7 and ti["label"] == 7 and ti["size"] == 28
    image = (pixels(ti["image"]) / 255).round(4).tolist()
    enc = post(client, "/api/runs/1/encode", {"image": image, "y": ti["label"]})
    x = torch.tensor(image, dtype=torch.float32).view(1, 1, 28, 28)
    with torch.inference_mode():
        mu, logvar = models[1].encode(x, torch.tensor([7]))
    np.testing.assert_allclose(enc["mu"], mu[0].numpy(), atol=1e-4)
    np.testing.assert_allclose(enc["sigma"], torch.exp(0.5 * logvar[0]).numpy(), rtol=1e-3)
    np.testing.assert_array_equal(pixels(enc["recon"]), expected(models[1], [mu[0].tolist()],
                                                                 [7])[0])
    enc3 = post(client, "/api/runs/2/encode", {"image": [[0] * 28] * 28})
    assert len(enc3["mu"]) == 3 and all(s > 0 for s in enc3["sigma"])
    last = client.get(f"/api/runs/0/test_image/{N_TEST - 1}")
    assert last.status_code == 200 and last.json()["label"] == (N_TEST - 1) % 10


def strict_json(text: str) -> object:
    """An answer parsed as JSON proper: NaN and Infinity are refused, as a browser would."""
    def refuse(name: str) -> None:
        raise AssertionError(f"{name} in a JSON answer")

    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize("i", [0, 1])
def test_true_posterior_of_a_test_image(client: TestClient, i: int) -> None:
    """p(z|x) on a grid: the grid's shape, non-negative, integrating to 1; KL(q || p) >= 0."""
    ti = client.get(f"/api/runs/{i}/test_image/7").json()
    image = (pixels(ti["image"]) / 255).round(4).tolist()
    body = {"image": image, **({"y": ti["label"]} if i == 1 else {})}
    r = client.post(f"/api/runs/{i}/posterior", json=body)
    assert r.status_code == 200, r.text
    post_ = strict_json(r.text)
    assert {"z1", "z2", "density", "density_scale", "log_px", "log_px_error", "elbo", "kl",
            "mu", "sigma"} <= set(post_)
    z1, z2 = np.array(post_["z1"]), np.array(post_["z2"])
    density = np.array(post_["density"]) * post_["density_scale"]
    assert z1.shape == z2.shape == (49,) and density.shape == (49, 49)  # 48 intervals per axis
    assert (np.diff(z1) > 0).all() and (np.diff(z2) > 0).all()
    assert (density >= 0).all() and np.isclose(np.max(post_["density"]), 1)
    mass = density.sum() * (z1[1] - z1[0]) * (z2[1] - z2[0])
    assert abs(mass - 1) < 0.05, mass
    assert post_["kl"] >= -0.05
    assert math.isclose(post_["kl"], post_["log_px"] - post_["elbo"], abs_tol=1e-3)
    assert post_["log_px"] < 0 and post_["log_px_error"] >= 0
    # q(z|x) as encode gives it, for the same image
    enc = post(client, f"/api/runs/{i}/encode", body)
    np.testing.assert_allclose(post_["mu"], enc["mu"], atol=1e-3)
    np.testing.assert_allclose(post_["sigma"], enc["sigma"], rtol=1e-2)
    # the posterior's mass is near q's mean: its mode within a few of q's sd
    k1, k2 = np.unravel_index(np.argmax(density), density.shape)
    mode = np.array([z1[k1], z2[k2]])
    assert (np.abs(mode - enc["mu"]) < 4 * np.array(enc["sigma"]) + 0.5).all(), (mode, enc)


def test_true_posterior_of_a_drawing(client: TestClient) -> None:
    """Any image in [0, 1] (not only a test image's 256 levels) gets a posterior."""
    stroke = [[0.0] * 28 for _ in range(28)]
    for k in range(6, 22):
        stroke[k][14] = stroke[k][13] = 0.8
    r = client.post("/api/runs/1/posterior", json={"image": stroke, "y": 1})
    assert r.status_code == 200, r.text
    data = strict_json(r.text)
    assert len(data["density"]) == 49 and data["kl"] >= -0.05


def test_true_posterior_needs_a_2d_latent(client: TestClient) -> None:
    r = client.post("/api/runs/2/posterior", json={"image": IMG})
    assert_refused(r, 400, "needs a 2-D latent, this run has 3")
    assert "\n" not in r.json()["error"]


def test_one_request_at_a_time_touches_the_models(client: TestClient) -> None:
    """Concurrent requests all succeed, and no two model calls ever overlap."""
    explorer = client.app.state.explorer
    model = explorer.runs[0].model
    original = model.decode
    inside, most = [0], [0]

    def watched(z, y=None):
        inside[0] += 1
        most[0] = max(most[0], inside[0])
        time.sleep(0.002)
        inside[0] -= 1
        return original(z, y)

    model.decode = watched
    try:
        with ThreadPoolExecutor(8) as pool:
            codes = list(pool.map(
                lambda k: client.post("/api/runs/0/decode", json={"z": [k / 10, 0]}).status_code,
                range(40)))
    finally:
        del model.decode
    assert codes == [200] * 40
    assert most[0] == 1


def test_missing_test_set_still_decodes(explore_runs: dict[str, Path], tmp_path: Path) -> None:
    run = tmp_path / "moved"
    shutil.copytree(explore_runs["vae"], run)
    cfg = json.loads((run / "config.json").read_text())
    cfg["config"]["dataset"] = f"idx:{tmp_path / 'gone'}"
    (run / "config.json").write_text(json.dumps(cfg))
    with TestClient(create_app([run])) as c:
        info = c.get("/api/runs/0").json()
        assert info["test_size"] == 0 and "unavailable" in info["data_error"]
        for path in ("/api/runs/0/points", "/api/runs/0/test_image/0"):
            r = c.get(path)
            assert r.status_code == 404 and "unavailable" in r.json()["error"]
        assert c.post("/api/runs/0/decode", json={"z": [0, 0]}).status_code == 200


def test_a_broken_run_is_answered_not_500(explore_runs: dict[str, Path],
                                          tmp_path: Path) -> None:
    """NaN weights and a NaN in summary.json: answers stay valid JSON (JSON has no NaN)."""
    run = tmp_path / "broken"
    shutil.copytree(explore_runs["cvae"], run)
    model = load_run(run).model
    with torch.no_grad():
        model.encoder.net[-1].bias.fill_(float("nan"))
        model.decoder.net[-1].bias.fill_(float("nan"))
    save_final(run, model, model.spec)
    (run / "summary.json").write_text('{"test": {"recon": NaN, "kl": 1.5, "neg_elbo": "x"}}')
    with TestClient(create_app([run])) as c:
        assert c.get("/api/runs").json()["runs"][0]["test"] == {"kl": 1.5}
        assert np.isfinite(np.array(c.get("/api/runs/0/points").json()["mu"])).all()
        enc = post(c, "/api/runs/0/encode", {"image": IMG, "y": 1})
        assert all(math.isfinite(v) for v in enc["mu"] + enc["sigma"])
        r = c.post("/api/runs/0/posterior", json={"image": IMG, "y": 1})
        assert_refused(r, 400, "non-finite")
        assert pixels(post(c, "/api/runs/0/decode", {"z": [0, 0], "y": 1})["image"]).shape == (
            28, 28)


# --------------------------------------------------------------------------------------------
# Bad input: 4xx with a message, never 500
# --------------------------------------------------------------------------------------------
IMG = [[0.0] * 28 for _ in range(28)]
JSON_CT = {"content-type": "application/json"}
BAD_BODIES = [
    # (run, endpoint, raw body, status, part of the message)
    (0, "decode", b"", 400, "empty"),
    (0, "decode", b"{", 400, "invalid JSON"),
    (0, "decode", b"nul", 400, "invalid JSON"),
    (0, "decode", b"\xff\xfe{}", 400, "UTF-8"),
    (0, "decode", b'\xef\xbb\xbf{"z": [0, 0]}', 400, "invalid JSON"),
    (0, "decode", b'{"z": [NaN, 0]}', 400, "NaN"),
    (0, "decode", b'{"z": [Infinity, 0]}', 400, "Infinity"),
    (0, "decode", b'{"z": [-Infinity, 0]}', 400, "Infinity"),
    (0, "decode", b'{"z": [1e999, 0]}', 400, "overflows"),
    (0, "decode", b'{"z": [-1e400, 0]}', 400, "overflows"),
    (0, "decode", b'{"z": [' + b"9" * 5000 + b", 0]}", 400, "too large"),
    (0, "decode", b'{"z": [0, 0], "z": [1, 2, 3]}', 400, "exactly 2"),
    (0, "decode", b"[" * 20000 + b"]" * 20000, 400, "invalid JSON"),
    (0, "decode", b'{"z": ' + b"[" * 5000 + b"]" * 5000 + b"}", 400, "invalid JSON"),
]
BAD_JSON = [
    # the body is not an object
    (0, "decode", [], "object"),
    (0, "decode", "z", "object"),
    (0, "decode", 3, "object"),
    (0, "decode", None, "object"),
    (0, "decode", True, "object"),
    # z
    (0, "decode", {}, "give z"),
    (0, "decode", {"z": None}, "array"),
    (0, "decode", {"z": "0,0"}, "array"),
    (0, "decode", {"z": {"0": 1, "1": 2}}, "array"),
    (0, "decode", {"z": 0.5}, "array"),
    (0, "decode", {"z": [0.5]}, "exactly 2"),
    (0, "decode", {"z": [0, 0, 0]}, "exactly 2"),
    (0, "decode", {"z": []}, "exactly 2"),
    (0, "decode", {"z": [[0, 0]]}, "exactly 2"),
    (0, "decode", {"z": [[0], [0]]}, "number"),
    (0, "decode", {"z": [True, False]}, "boolean"),
    (0, "decode", {"z": [0, None]}, "null"),
    (0, "decode", {"z": ["1", 0]}, "string"),
    (0, "decode", {"z": [10.001, 0]}, "within"),
    (0, "decode", {"z": [0, -11]}, "within"),
    (0, "decode", {"z": [10**18, 0]}, "within"),
    (0, "decode", {"z": [1e308, 0]}, "within"),
    (2, "decode", {"z": [0, 0]}, "exactly 3"),
    (0, "decode", {"z": [0, 0], "extra": 1}, "unknown"),
    (0, "decode", {"Z": [0, 0]}, "unknown"),
    # the class
    (0, "decode", {"z": [0, 0], "y": 3}, "VAE"),
    (0, "decode", {"z": [0, 0], "y": None}, "VAE"),
    (1, "decode", {"z": [0, 0]}, "CVAE"),
    (1, "decode", {"z": [0, 0], "y": None}, "integer"),
    (1, "decode", {"z": [0, 0], "y": True}, "integer"),
    (1, "decode", {"z": [0, 0], "y": 1.0}, "integer"),
    (1, "decode", {"z": [0, 0], "y": "3"}, "integer"),
    (1, "decode", {"z": [0, 0], "y": [3]}, "integer"),
    (1, "decode", {"z": [0, 0], "y": 10}, "0-9"),
    (1, "decode", {"z": [0, 0], "y": -1}, "0-9"),
    (1, "decode", {"z": [0, 0], "y": 10**19}, "0-9"),
    # batches
    (0, "decode_batch", {}, "zs"),
    (0, "decode_batch", {"zs": []}, "1 to"),
    (0, "decode_batch", {"zs": [[0, 0]] * (MAX_BATCH + 1)}, "1 to"),
    (0, "decode_batch", {"zs": [0, 0]}, "zs[0]"),
    (0, "decode_batch", {"zs": [[0, 0], [0, "a"]]}, "zs[1][1]"),
    (0, "decode_batch", {"zs": None}, "array"),
    (0, "decode_batch", {"zs": {"a": [0, 0]}}, "array"),
    (0, "decode_batch", {"z": [0, 0]}, "zs"),
    (0, "decode_batch", {"z": [0, 0], "ys": [1, 2]}, "VAE"),
    (0, "decode_batch", {"zs": [[0, 0]], "y": 1}, "VAE"),
    (1, "decode_batch", {"zs": [[0, 0]]}, "CVAE"),
    (1, "decode_batch", {"zs": [[0, 0]], "y": 1, "ys": [1]}, "either"),
    (1, "decode_batch", {"z": [0, 0], "zs": [[0, 0]], "ys": [1]}, "either"),
    (1, "decode_batch", {"z": [0, 0]}, "ys"),
    (1, "decode_batch", {"z": [0, 0], "y": 1}, "ys"),
    (1, "decode_batch", {"z": [0, 0], "ys": []}, "1 to"),
    (1, "decode_batch", {"z": [0, 0], "ys": [0] * (MAX_BATCH + 1)}, "1 to"),
    (1, "decode_batch", {"z": [0, 0], "ys": [0, 10]}, "ys[1]"),
    (1, "decode_batch", {"z": [0, 0], "ys": [0, False]}, "ys[1]"),
    (1, "decode_batch", {"z": [0, 0], "ys": 3}, "array"),
    (1, "decode_batch", {"zs": [[0, 0], [1, 1]], "ys": [1]}, "rows"),
    # images
    (0, "encode", {}, "give image"),
    (0, "encode", {"image": None}, "28 arrays"),
    (0, "encode", {"image": [0.0] * 784}, "exactly 28 rows"),
    (0, "encode", {"image": IMG[:27]}, "exactly 28 rows"),
    (0, "encode", {"image": IMG + [[0.0] * 28]}, "exactly 28 rows"),
    (0, "encode", {"image": [[0.0] * 29] + IMG[1:]}, "image[0]"),
    (0, "encode", {"image": IMG[:27] + [[0.0] * 27]}, "image[27]"),
    (0, "encode", {"image": [[1.5] + [0.0] * 27] + IMG[1:]}, "[0, 1]"),
    (0, "encode", {"image": IMG[:5] + [[0.0] * 27 + [-0.01]] + IMG[6:]}, "image[5][27]"),
    (0, "encode", {"image": [[True] * 28] + IMG[1:]}, "boolean"),
    (0, "encode", {"image": [[None] * 28] + IMG[1:]}, "null"),
    (0, "encode", {"image": [["0"] * 28] + IMG[1:]}, "string"),
    (0, "encode", {"image": [[[0.0]] * 28] + IMG[1:]}, "array"),
    (0, "encode", {"image": "iVBORw0KGgo"}, "28 arrays"),
    (0, "encode", {"image": IMG, "y": 1}, "VAE"),
    (1, "encode", {"image": IMG}, "CVAE"),
    (1, "encode", {"image": IMG, "y": 3.5}, "integer"),
]


ENCODE_REFUSALS = [(run, body) for run, endpoint, body, _ in BAD_JSON if endpoint == "encode"]
ENCODE_RAW = [b"", b"{", b'{"image": NaN}', b"[]", b'{"image": [' + b"[" * 5000 + b"]}"]


def assert_refused(r, status: int | tuple[int, ...], fragment: str = "") -> None:
    assert r.status_code in ((status,) if isinstance(status, int) else status), r.text
    assert r.headers["content-type"].startswith("application/json")
    message = r.json()["error"]
    assert isinstance(message, str) and message
    assert fragment in message, message


@pytest.mark.parametrize(("run", "endpoint", "raw", "status", "fragment"), BAD_BODIES)
def test_bad_raw_bodies(client: TestClient, run: int, endpoint: str, raw: bytes, status: int,
                        fragment: str) -> None:
    r = client.post(f"/api/runs/{run}/{endpoint}", content=raw, headers=JSON_CT)
    assert_refused(r, status, fragment)


@pytest.mark.parametrize(("run", "endpoint", "body", "fragment"), BAD_JSON)
def test_bad_json_values(client: TestClient, run: int, endpoint: str, body: object,
                         fragment: str) -> None:
    r = client.post(f"/api/runs/{run}/{endpoint}", content=json.dumps(body), headers=JSON_CT)
    assert_refused(r, 400, fragment)


@pytest.mark.parametrize(("run", "body"), ENCODE_REFUSALS)
def test_posterior_refuses_what_encode_refuses(client: TestClient, run: int,
                                               body: object) -> None:
    """The same body checks, hence the same status and message, as encode."""
    want = client.post(f"/api/runs/{run}/encode", content=json.dumps(body), headers=JSON_CT)
    got = client.post(f"/api/runs/{run}/posterior", content=json.dumps(body), headers=JSON_CT)
    assert_refused(got, want.status_code)
    assert got.status_code == 400 and got.json() == want.json()


@pytest.mark.parametrize("raw", ENCODE_RAW)
def test_posterior_refuses_bad_raw_bodies_as_encode(client: TestClient, raw: bytes) -> None:
    want = client.post("/api/runs/1/encode", content=raw, headers=JSON_CT)
    got = client.post("/api/runs/1/posterior", content=raw, headers=JSON_CT)
    assert_refused(got, want.status_code)
    assert got.json() == want.json()
    plain = client.post("/api/runs/1/posterior", content=b"{}", headers={"content-type": "x"})
    assert_refused(plain, 415, "application/json")


@pytest.mark.parametrize("ctype", [None, "text/plain", "application/x-www-form-urlencoded",
                                   "multipart/form-data; boundary=x", "application/jsonx",
                                   "text/json", ""])
def test_wrong_content_type(client: TestClient, ctype: str | None) -> None:
    headers = {} if ctype is None else {"content-type": ctype}
    r = client.post("/api/runs/0/decode", content=b'{"z": [0, 0]}', headers=headers)
    assert_refused(r, 415, "application/json")
    ok = client.post("/api/runs/0/decode", content=b'{"z": [0, 0]}',
                     headers={"content-type": "Application/JSON; charset=utf-8"})
    assert ok.status_code == 200


def test_body_size_limits(client: TestClient) -> None:
    padded = b'{"z": [0, 0]' + b" " * MAX_BODY + b"}"
    assert_refused(client.post("/api/runs/0/decode", content=padded, headers=JSON_CT), 413)
    # no Content-Length (chunked): the read itself stops at the limit
    chunks = (b" " * 4096 for _ in range(MAX_BODY // 4096 + 2))
    r = client.post("/api/runs/0/decode", content=chunks, headers=JSON_CT)
    assert_refused(r, 413)
    for length in ("abc", "-1", "1" * 40, "99999999"):
        r = client.post("/api/runs/0/decode", content=b"{}",
                        headers={**JSON_CT, "content-length": length})
        assert_refused(r, (400, 413))
    just_fits = b'{"z": [0, 0]' + b" " * (MAX_BODY - 13) + b"}"
    assert len(just_fits) == MAX_BODY
    assert client.post("/api/runs/0/decode", content=just_fits, headers=JSON_CT).status_code == 200


@pytest.mark.parametrize("path", [
    "/api/runs/3/points", "/api/runs/-1/points", "/api/runs/x/points",
    "/api/runs/99999999999999999999999/points", "/api/runs/\uff11/points", "/api/runs/1.0",
    "/api/runs/0/test_image/120", "/api/runs/0/test_image/-1", "/api/runs/0/test_image/1e2",
    "/api/runs/0/test_image/" + "9" * 50, "/api/runs/0/test_image/", "/api/runs/0/nothing",
    "/api", "/api/", "/api/run", "/api/runs/0/points/extra",
])
def test_unknown_runs_and_paths_are_404(client: TestClient, path: str) -> None:
    assert_refused(client.get(path), 404)


@pytest.mark.parametrize(("method", "path"), [
    ("GET", "/api/runs/0/decode"), ("GET", "/api/runs/0/decode_batch"),
    ("GET", "/api/runs/0/encode"), ("GET", "/api/runs/0/posterior"),
    ("PUT", "/api/runs/0/decode"),
    ("POST", "/api/runs"), ("POST", "/api/runs/0/points"), ("DELETE", "/api/runs/0"),
    ("POST", "/"), ("PATCH", "/static/app.js"), ("OPTIONS", "/api/runs/0/decode"),
])
def test_wrong_method_is_405(client: TestClient, method: str, path: str) -> None:
    r = client.request(method, path, content=b"{}", headers=JSON_CT)
    assert_refused(r, 405, "not allowed")


def test_bad_post_to_a_missing_run_is_404_not_500(client: TestClient) -> None:
    r = client.post("/api/runs/7/decode", content=b"not json", headers={"content-type": "x"})
    assert_refused(r, 404, "no run")


# --------------------------------------------------------------------------------------------
# The page and its assets; nothing else
# --------------------------------------------------------------------------------------------
def test_page_and_assets(client: TestClient) -> None:
    for path in ("/", "/index.html"):
        r = client.get(path)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        assert "script-src 'self'" in r.headers["content-security-policy"]
        assert '<script src="/static/app.js"' in r.text
        assert 'href="/static/style.css"' in r.text
    js = client.get("/static/app.js")
    assert js.status_code == 200 and "javascript" in js.headers["content-type"]
    css = client.get("/static/style.css")
    assert css.status_code == 200 and css.headers["content-type"].startswith("text/css")
    assert js.headers["x-content-type-options"] == "nosniff"
    for r in (client.get("/"), js, css):  # no CDN, no remote anything
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", r.text, re.I), r.url
    assert client.head("/static/app.js").status_code == 200


@pytest.mark.parametrize("path", [
    "/static/../server.py", "/static/%2e%2e/server.py", "/static/..%2fserver.py",
    "/static/%2e%2e%2f__init__.py", "/static/..%2F..%2Fcli.py", "/static/....//server.py",
    "/static/server.py", "/static/__init__.py", "/static/", "/static", "/static/index.html",
    "/static/app.js/..", "/static/app.js%00", "/static/app.js%2500", "/static/APP.JS",
    "/static/%2fetc%2fpasswd", "/static//etc/passwd", "/static/..\\server.py",
    "/static/..%5cserver.py", "/../../etc/passwd", "/%2e%2e/%2e%2e/etc/passwd",
    "/explore/static/app.js", "/src/vaelab/explore/server.py", "/app.js", "/style.css",
    "/static/app.js?x=../server.py&", "/static/style.css/", "/index.htm", "/favicon.ico",
])
def test_traversal_and_unlisted_paths_are_404(client: TestClient, path: str) -> None:
    r = client.get(path)
    if path.startswith("/static/app.js?"):  # a query string does not change the file
        assert r.status_code == 200
        return
    assert_refused(r, 404)
    assert "import" not in r.text and "root:" not in r.text


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------
def test_cli_refuses_bad_runs_and_ports(explore_runs: dict[str, Path], tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    for args in (["explore", str(tmp_path / "none")], ["explore", str(tmp_path)],
                 ["explore", str(explore_runs["vae"]), "--port", "70000"]):
        assert main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("vaelab: error: "), err


def test_cli_serves_on_a_free_port(explore_runs: dict[str, Path]) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "vaelab", "explore", str(explore_runs["vae"]),
         str(explore_runs["cvae"]), "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = None
        deadline = time.monotonic() + 60
        lines = []
        while url is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            m = re.search(r"(http://127\.0\.0\.1:\d+/)", line)
            url = m and m.group(1)
        assert url, "".join(lines) + proc.stderr.read()
        with urllib.request.urlopen(url + "api/runs", timeout=10) as r:
            runs = json.loads(r.read())["runs"]
        assert [r["kind"] for r in runs] == ["vae", "cvae"]
        req = urllib.request.Request(url + "api/runs/1/decode", data=b'{"z": [0, 0], "y": 2}',
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as r:
            assert len(base64.b64decode(json.loads(r.read())["image"])) == 784
        # a Host header that is not this machine's is refused (DNS rebinding)
        req = urllib.request.Request(url + "api/runs", headers={"Host": "evil.example:80"})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=10)
        assert e.value.code == 400
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl+C: a clean stop
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    out, err = proc.communicate()
    assert proc.returncode == 0, err
    assert "stopped" in out and "Traceback" not in err
