"""POST/GET/DELETE /v1/datasets: npz uploads, header-only schema reading, refusals, file:// URIs."""

from __future__ import annotations

import io
import zipfile

import numpy as np

from tests.support.teachers import npz_bytes


def post_npz(client, headers, content: bytes, name="digits", **extra):
    return client.post("/v1/datasets", headers=headers, files={"file": ("d.npz", content)},
                       data={"name": name, "format": "npz", **extra})


def test_npz_upload_reports_rows_and_labels(client, make_key, digits_npz, digits):
    h = make_key("data-a")
    r = post_npz(client, h, digits_npz)
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["num_rows"] == len(digits.x_train) and body["has_labels"] is True
    assert body["schema"]["arrays"]["x"]["shape"] == [len(digits.x_train), 64]
    assert body["id"].startswith("ds_")
    unlabeled = post_npz(client, h, npz_bytes(x=digits.x_train[:50]))
    assert unlabeled.status_code == 201 and unlabeled.json()["has_labels"] is False


def _object_array_npz() -> bytes:
    """An .npz whose 'x' holds pickled Python objects (np.savez would write this with allow_pickle)."""
    arr, out = io.BytesIO(), io.BytesIO()
    np.lib.format.write_array(arr, np.array([{"a": 1}, {"b": 2}], dtype=object), allow_pickle=True)
    with zipfile.ZipFile(out, "w") as zf:
        zf.writestr("x.npy", arr.getvalue())
    return out.getvalue()


def test_npz_refusals_are_precise(client, make_key):
    h = make_key("data-b")
    cases = {
        "no array 'x'": npz_bytes(features=np.zeros((4, 2), np.float32)),
        "'y' has 3 rows but 'x' has 4": npz_bytes(x=np.zeros((4, 2), np.float32), y=np.zeros(3, np.int64)),
        "Python objects": _object_array_npz(),
        "not an .npz": b"definitely not a zip",
    }
    for needle, content in cases.items():
        r = post_npz(client, h, content)
        assert r.status_code == 422, (needle, r.text)
        assert needle in r.json()["detail"], (needle, r.json()["detail"])


def test_unsupported_format_and_missing_fields(client, make_key, digits_npz):
    h = make_key("data-c")
    r = client.post("/v1/datasets", headers=h, files={"file": ("d", digits_npz)}, data={"name": "d", "format": "tfrecord"})
    assert r.status_code == 422 and "not supported" in r.json()["detail"]
    r = client.post("/v1/datasets", headers=h, files={"file": ("d", digits_npz)}, data={"name": "d"})
    assert r.status_code == 422 and "format" in r.json()["detail"]


def test_file_uri_inside_allowed_root_only(client, make_key, digits_npz, tmp_path, monkeypatch):
    from app.settings import get_settings

    h = make_key("data-d")
    path = tmp_path / "d.npz"
    path.write_bytes(digits_npz)
    body = {"name": "by-uri", "uri": f"file://{path}", "format": "npz"}
    r = client.post("/v1/datasets", headers=h, json=body)
    assert r.status_code == 422 and r.json()["code"] == "uri_not_allowed"
    monkeypatch.setattr(get_settings(), "allowed_file_roots", [tmp_path])
    r = client.post("/v1/datasets", headers=h, json=body)
    assert r.status_code == 201, r.text
    assert r.json()["num_rows"] > 0
    r = client.post("/v1/datasets", headers=h, json={**body, "colour": "red"})
    assert r.status_code == 422 and r.json()["errors"][0]["loc"][-1] == "colour"
    r = client.post("/v1/datasets", headers=h, json={**body, "uri": "s3://bucket/d.npz"})
    assert r.status_code == 422 and r.json()["code"] == "uri_not_enabled"
