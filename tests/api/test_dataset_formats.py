"""csv, parquet, pt and image_folder uploads are read by the engine's reader (in a subprocess) and described."""

from __future__ import annotations

import io
import json
import zipfile

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # each test inspects a real dataset upload in the sandbox (a process each)


def post(client, headers, content: bytes, fmt: str, **extra):
    return client.post("/v1/datasets", headers=headers, files={"file": (f"d.{fmt}", content)},
                       data={"name": f"digits-{fmt}", "format": fmt, **extra})


def _csv(digits, with_label=True) -> bytes:
    cols = [f"px{i}" for i in range(64)] + (["digit"] if with_label else [])
    rows = [",".join(cols)]
    for x, y in zip(digits.x_train[:200], digits.y_train[:200]):
        rows.append(",".join(f"{v:.4f}" for v in x) + (f",{y}" if with_label else ""))
    return ("\n".join(rows) + "\n").encode()


def test_csv_with_and_without_label_column(client, make_key, digits):
    h = make_key("fmt-csv")
    r = post(client, h, _csv(digits), "csv", label_column="digit")
    assert r.status_code == 201, r.text
    assert r.json()["num_rows"] == 200 and r.json()["has_labels"] is True
    assert r.json()["schema"]["options"] == {"label_column": "digit"}
    r = post(client, h, _csv(digits, with_label=False), "csv")
    assert r.status_code == 201 and r.json()["has_labels"] is False
    r = post(client, h, _csv(digits), "csv", label_column="nope")
    assert r.status_code == 422 and "nope" in r.json()["detail"]


def test_parquet(client, make_key, digits):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({**{f"px{i}": digits.x_train[:300, i] for i in range(64)}, "digit": digits.y_train[:300]})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    r = post(client, make_key("fmt-pq"), buf.getvalue(), "parquet", options=json.dumps({"label_column": "digit"}))
    assert r.status_code == 201, r.text
    assert r.json()["num_rows"] == 300 and r.json()["has_labels"] is True


def test_pt_tensors_only(client, make_key, digits, tmp_path):
    import torch

    path = tmp_path / "d.pt"
    torch.save({"x": torch.from_numpy(digits.x_train[:100]), "y": torch.from_numpy(digits.y_train[:100])}, path)
    r = post(client, make_key("fmt-pt"), path.read_bytes(), "pt")
    assert r.status_code == 201, r.text
    assert r.json()["num_rows"] == 100 and r.json()["has_labels"] is True
    torch.save({"x": torch.nn.Linear(2, 2)}, path)  # a module, not tensors: never unpickled
    r = post(client, make_key("fmt-pt"), path.read_bytes(), "pt")
    assert r.status_code == 422


def test_image_folder_zip(client, make_key, digits):
    from PIL import Image

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for i, (x, y) in enumerate(zip(digits.x_train[:60], digits.y_train[:60])):
            img = Image.fromarray((x.reshape(8, 8) * 255).astype(np.uint8), mode="L")
            png = io.BytesIO()
            img.save(png, format="PNG")
            zf.writestr(f"digit_{y}/{i}.png", png.getvalue())
    opts = json.dumps({"image_size": [8, 8], "grayscale": True})
    r = post(client, make_key("fmt-img"), buf.getvalue(), "image_folder", options=opts)
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["num_rows"] == 60 and body["has_labels"] is True
    assert body["schema"]["arrays"]["x"]["shape"][1:] == [1, 8, 8]
    bad_opts = post(client, make_key("fmt-img"), buf.getvalue(), "image_folder", options='{"image_size": [0, 8]}')
    assert bad_opts.status_code == 422
