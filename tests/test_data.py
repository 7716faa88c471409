"""Tests for flatjax.data: formats, broken files, sources, download, standardization, subsets."""

import functools
import gzip
import hashlib
import http.server
import io
import logging
import os
import pickle
import socket
import sys
import tarfile
import threading
import types
from pathlib import Path

import numpy as np
import pytest

from flatjax import data

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CIFAR_SHAPE = (32, 32, 3)
FASHION_SHAPE = (28, 28, 1)


@pytest.fixture(autouse=True)
def hermetic(monkeypatch, tmp_path):
    """No real data dir, Debian folder, TFDS, cache or network unless a test sets one up."""
    monkeypatch.delenv("FLATJAX_DATA_DIR", raising=False)
    monkeypatch.delenv("FLATJAX_DOWNLOAD_URL", raising=False)
    monkeypatch.setenv("FLATJAX_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    monkeypatch.setitem(data.DEBIAN_FOLDERS, "fashion_mnist", tmp_path / "no-debian")
    monkeypatch.setitem(sys.modules, "tensorflow", None)  # makes `import tensorflow` fail
    monkeypatch.setitem(data.BASE_URLS, "cifar10", "http://127.0.0.1:9/unused/")
    monkeypatch.setitem(data.BASE_URLS, "fashion_mnist", "http://127.0.0.1:9/unused/")


# --------------------------------------------------------------------------------------------------
# Writers of small files in every format


def fake_dataset(image_shape, n_train=10, n_test=4, seed=0):
    rng = np.random.default_rng(seed)
    return data.Dataset(
        rng.integers(0, 256, (n_train, *image_shape), dtype=np.uint8),
        rng.integers(0, 10, n_train).astype(np.int32),
        rng.integers(0, 256, (n_test, *image_shape), dtype=np.uint8),
        rng.integers(0, 10, n_test).astype(np.int32))


def idx_bytes(array):
    magic = (0x0800 | array.ndim).to_bytes(4, "big")
    dims = b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return magic + dims + array.astype(np.uint8).tobytes()


def write_fashion_idx(folder, ds, compress=True):
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {"train-images-idx3-ubyte": ds.x_train[..., 0], "train-labels-idx1-ubyte": ds.y_train,
              "t10k-images-idx3-ubyte": ds.x_test[..., 0], "t10k-labels-idx1-ubyte": ds.y_test}
    for stem, array in arrays.items():
        raw = idx_bytes(array)
        if compress:
            (folder / f"{stem}.gz").write_bytes(gzip.compress(raw))
        else:
            (folder / stem).write_bytes(raw)
    return folder


def cifar_rows(x):
    return x.transpose(0, 3, 1, 2).reshape(len(x), -1)


def cifar_batches(ds):
    """(name, images, labels) of the five train batches and the test batch."""
    parts = np.array_split(np.arange(len(ds.x_train)), 5)
    batches = [(f"data_batch_{i + 1}", ds.x_train[p], ds.y_train[p]) for i, p in enumerate(parts)]
    return batches + [("test_batch", ds.x_test, ds.y_test)]


def python_batch(x, y):
    batch = {b"batch_label": b"fake", b"data": cifar_rows(x), b"labels": [int(v) for v in y]}
    return pickle.dumps(batch, protocol=2)


def write_cifar_python(folder, ds):
    batches = folder / "cifar-10-batches-py"
    batches.mkdir(parents=True)
    for name, x, y in cifar_batches(ds):
        (batches / name).write_bytes(python_batch(x, y))
    return batches


def write_cifar_binary(folder, ds):
    batches = folder / "cifar-10-batches-bin"
    batches.mkdir(parents=True)
    for name, x, y in cifar_batches(ds):
        records = np.concatenate([y.astype(np.uint8)[:, None], cifar_rows(x)], axis=1)
        (batches / f"{name}.bin").write_bytes(records.tobytes())
    return batches


def cifar_tarball(ds):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, x, y in cifar_batches(ds):
            payload = python_batch(x, y)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))
    return buffer.getvalue()


def write_cifar_tar(folder, ds):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cifar-10-python.tar.gz").write_bytes(cifar_tarball(ds))


def write_npz(folder, ds, filename="data.npz", **overrides):
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / filename, **{**ds._asdict(), **overrides})
    return folder / filename


def assert_same(actual, expected):
    for field, a, e in zip(data.Dataset._fields, actual, expected):
        assert a.dtype == e.dtype, field
        np.testing.assert_array_equal(a, e, err_msg=field)


# --------------------------------------------------------------------------------------------------
# Formats


@pytest.mark.parametrize("compress", [True, False], ids=["gz", "raw"])
@pytest.mark.parametrize("folder", ["fashion-mnist", "fashion_mnist"])
def test_fashion_idx_roundtrip(tmp_path, compress, folder):
    ds = fake_dataset(FASHION_SHAPE)
    write_fashion_idx(tmp_path / folder, ds, compress)
    assert_same(data.load_raw("fashion_mnist", tmp_path, download=False), ds)


@pytest.mark.parametrize("writer", [write_cifar_python, write_cifar_binary, write_cifar_tar,
                                    write_npz])
def test_cifar_formats_roundtrip(tmp_path, writer):
    ds = fake_dataset(CIFAR_SHAPE, n_train=12, n_test=3)
    writer(tmp_path / "cifar10", ds)
    assert_same(data.load_raw("cifar10", tmp_path, download=False), ds)


def test_npz_fashion_without_channel_axis(tmp_path):
    ds = fake_dataset(FASHION_SHAPE)
    write_npz(tmp_path / "fashion-mnist", ds, x_train=ds.x_train[..., 0], x_test=ds.x_test[..., 0],
              y_train=ds.y_train.astype(np.int64))
    assert_same(data.load_raw("fashion_mnist", tmp_path, download=False), ds)


def test_load_raw_is_cached_and_read_only(tmp_path):
    write_npz(tmp_path / "cifar10", fake_dataset(CIFAR_SHAPE))
    first = data.load_raw("cifar10", tmp_path, download=False)
    assert data.load_raw("cifar10", tmp_path, download=False).x_train is first.x_train
    with pytest.raises(ValueError, match="read-only"):
        first.x_train[0, 0, 0, 0] = 1


def test_unknown_name_lists_known_names():
    with pytest.raises(ValueError, match="cifar10, fashion_mnist"):
        data.load_raw("mnist")


# --------------------------------------------------------------------------------------------------
# Broken files: each error names the file


def broken_fashion(tmp_path, stem, content):
    folder = write_fashion_idx(tmp_path / "fashion-mnist", fake_dataset(FASHION_SHAPE))
    path = folder / stem
    path.write_bytes(content(path.read_bytes()))
    return path


@pytest.mark.parametrize("stem, content, message", [
    ("train-images-idx3-ubyte.gz", lambda b: b[: len(b) // 2], "not a complete gzip file"),
    ("train-images-idx3-ubyte.gz", lambda b: b"not gzip at all", "not a complete gzip file"),
    ("t10k-labels-idx1-ubyte.gz",
     lambda b: gzip.compress(gzip.decompress(b)[:-1]), r"truncated or damaged"),
    ("train-labels-idx1-ubyte.gz",
     lambda b: gzip.compress(b"\x00\x00\x08\x03" + gzip.decompress(b)[4:]), "magic number"),
    ("t10k-images-idx3-ubyte.gz", lambda b: gzip.compress(b"\x00\x00"), "shorter than an IDX"),
])
def test_broken_idx_names_file(tmp_path, stem, content, message):
    path = broken_fashion(tmp_path, stem, content)
    with pytest.raises(ValueError, match=message) as error:
        data.load_raw("fashion_mnist", tmp_path, download=False)
    assert str(path) in str(error.value)


def test_truncated_raw_idx_names_file(tmp_path):
    folder = write_fashion_idx(tmp_path / "fashion-mnist", fake_dataset(FASHION_SHAPE),
                               compress=False)
    path = folder / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match="header says shape") as error:
        data.load_raw("fashion_mnist", tmp_path, download=False)
    assert str(path) in str(error.value)


def test_label_count_mismatch_in_idx_names_labels_file(tmp_path):
    ds = fake_dataset(FASHION_SHAPE)
    folder = write_fashion_idx(tmp_path / "fashion-mnist", ds)
    (folder / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(ds.y_train[:-1])))
    with pytest.raises(ValueError, match="expected 10 integers") as error:
        data.load_raw("fashion_mnist", tmp_path, download=False)
    assert "train-labels-idx1-ubyte.gz" in str(error.value)


def test_incomplete_idx_folder_names_missing_file(tmp_path):
    folder = write_fashion_idx(tmp_path / "fashion-mnist", fake_dataset(FASHION_SHAPE))
    (folder / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte.gz"):
        data.load_raw("fashion_mnist", tmp_path, download=False)


@pytest.mark.parametrize("overrides, message", [
    ({"x_train": np.zeros((10, 32, 32), np.uint8)}, r"x_train\): images are uint8 of shape"),
    ({"x_test": np.zeros((4, 3, 32, 32), np.uint8)}, r"x_test\).*expected uint8 of shape \(N, 32"),
    ({"x_train": np.zeros((10, 32, 32, 3), np.float32)}, r"x_train\): images are float32"),
    ({"y_train": np.zeros(9, np.int64)}, r"y_train\).*expected 10 integers"),
    ({"y_test": np.array([0, 1, 2, 10])}, r"y_test\).*range over 0..10, expected 0..9"),
    ({"y_test": np.array([0.0, 1, 2, 3])}, r"y_test\).*float64"),
])
def test_npz_with_wrong_contents_names_file(tmp_path, overrides, message):
    path = write_npz(tmp_path / "cifar10", fake_dataset(CIFAR_SHAPE), **overrides)
    with pytest.raises(ValueError, match=message) as error:
        data.load_raw("cifar10", tmp_path, download=False)
    assert str(path) in str(error.value)


def test_npz_missing_key_and_truncated(tmp_path):
    ds = fake_dataset(CIFAR_SHAPE)
    path = tmp_path / "cifar10" / "c.npz"
    path.parent.mkdir()
    np.savez(path, x_train=ds.x_train, y_train=ds.y_train, x_test=ds.x_test)
    with pytest.raises(ValueError, match="has no y_test") as error:
        data.load_raw("cifar10", tmp_path, download=False)
    assert str(path) in str(error.value)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError, match="cannot read it as an .npz") as error:
        data.load_raw("cifar10", tmp_path, download=False)
    assert str(path) in str(error.value)


def test_several_npz_files_are_ambiguous(tmp_path):
    write_npz(tmp_path / "cifar10", fake_dataset(CIFAR_SHAPE), "a.npz")
    write_npz(tmp_path / "cifar10", fake_dataset(CIFAR_SHAPE), "b.npz")
    with pytest.raises(ValueError, match="several .npz files"):
        data.load_raw("cifar10", tmp_path, download=False)


def test_truncated_cifar_batches_name_file(tmp_path):
    ds = fake_dataset(CIFAR_SHAPE)
    batch = write_cifar_python(tmp_path / "py" / "cifar10", ds) / "data_batch_3"
    batch.write_bytes(batch.read_bytes()[:-50])
    with pytest.raises(ValueError, match="cannot read it as a CIFAR-10 python batch") as error:
        data.load_raw("cifar10", tmp_path / "py", download=False)
    assert str(batch) in str(error.value)

    record = write_cifar_binary(tmp_path / "bin" / "cifar10", ds) / "test_batch.bin"
    record.write_bytes(record.read_bytes()[:-1])
    with pytest.raises(ValueError, match="not a whole number of 3073-byte records") as error:
        data.load_raw("cifar10", tmp_path / "bin", download=False)
    assert str(record) in str(error.value)

    tar = tmp_path / "tar" / "cifar10" / "cifar-10-python.tar.gz"
    write_cifar_tar(tar.parent, ds)
    tar.write_bytes(tar.read_bytes()[:-30])
    with pytest.raises(ValueError, match="not a complete tar.gz archive") as error:
        data.load_raw("cifar10", tmp_path / "tar", download=False)
    assert str(tar) in str(error.value)


def test_missing_cifar_batch_names_it(tmp_path):
    batches = write_cifar_binary(tmp_path / "cifar10", fake_dataset(CIFAR_SHAPE))
    (batches / "data_batch_5.bin").unlink()
    with pytest.raises(FileNotFoundError, match="has no data_batch_5.bin"):
        data.load_raw("cifar10", tmp_path, download=False)


def test_python_batch_may_not_run_code(tmp_path):
    batches = write_cifar_python(tmp_path / "cifar10", fake_dataset(CIFAR_SHAPE))
    (batches / "test_batch").write_bytes(pickle.dumps({b"data": os.getcwd, b"labels": []}))
    with pytest.raises(ValueError, match="refusing to load") as error:
        data.load_raw("cifar10", tmp_path, download=False)
    assert "test_batch" in str(error.value)


# --------------------------------------------------------------------------------------------------
# Standardization and subsets


def test_standardize_uses_train_stats_and_guards_constant_features():
    rng = np.random.default_rng(1)
    x_train = rng.integers(0, 256, (300, 4, 4, 3), dtype=np.uint8)
    x_train[:, 0, 0, :] = 7  # constant over the train set
    x_test = rng.integers(0, 256, (50, 4, 4, 3), dtype=np.uint8)
    train, test = data.standardize(x_train, x_test)
    assert train.dtype == test.dtype == np.float32
    assert train.shape == x_train.shape and test.shape == x_test.shape
    assert np.isfinite(train).all() and np.isfinite(test).all()

    varying = np.ones((4, 4, 3), bool)
    varying[0, 0, :] = False
    as_f64 = train.astype(np.float64)
    np.testing.assert_allclose(as_f64.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(as_f64.std(0)[varying], 1, atol=1e-5)
    np.testing.assert_array_equal(train[:, 0, 0, :], 0)

    scaled_train, scaled_test = x_train / 255.0, x_test / 255.0
    mean, std = scaled_train.mean(0), scaled_train.std(0)
    expected = (scaled_test - mean) / np.where(varying, std, 1)
    np.testing.assert_allclose(test, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(test[:, 0, 0, :], scaled_test[:, 0, 0, :] - 7 / 255, atol=1e-6)


def test_strided_subset_indices():
    x, y = np.arange(10) * 10, np.arange(10)
    xs, ys = data.strided_subset(x, y, 3)
    np.testing.assert_array_equal(ys, [0, 3, 6])
    np.testing.assert_array_equal(xs, [0, 30, 60])
    np.testing.assert_array_equal(data.strided_subset(x, y, 10)[1], y)
    np.testing.assert_array_equal(data.strided_subset(x, y, 1)[1], [0])
    for bad in (0, -1, 11):
        with pytest.raises(ValueError, match="subset size must be in 1..10"):
            data.strided_subset(x, y, bad)
    with pytest.raises(ValueError, match="y has 9"):
        data.strided_subset(x, y[:9], 3)


def test_load_standardizes_with_subset_stats(tmp_path):
    ds = fake_dataset(FASHION_SHAPE, n_train=40, n_test=6)
    write_fashion_idx(tmp_path / "fashion-mnist", ds)
    out = data.load("fashion_mnist", tmp_path, train_subset=8, download=False)
    x_sub, y_sub = ds.x_train[::5], ds.y_train[::5]
    np.testing.assert_array_equal(out.y_train, y_sub)
    np.testing.assert_array_equal(out.y_test, ds.y_test)
    expected_train, expected_test = data.standardize(x_sub, ds.x_test)
    np.testing.assert_array_equal(out.x_train, expected_train)
    np.testing.assert_array_equal(out.x_test, expected_test)
    assert out.x_train.flags.writeable and out.y_train.flags.writeable


# --------------------------------------------------------------------------------------------------
# Sources and their order


def test_env_data_dir_and_explicit_precedence(tmp_path, monkeypatch):
    env_ds, arg_ds = fake_dataset(CIFAR_SHAPE, seed=1), fake_dataset(CIFAR_SHAPE, seed=2)
    write_npz(tmp_path / "env" / "cifar10", env_ds)
    write_npz(tmp_path / "arg" / "cifar10", arg_ds)
    monkeypatch.setenv("FLATJAX_DATA_DIR", str(tmp_path / "env"))
    assert_same(data.load_raw("cifar10", download=False), env_ds)
    assert_same(data.load_raw("cifar10", tmp_path / "arg", download=False), arg_ds)


def test_the_source_used_is_logged(tmp_path, monkeypatch, caplog):
    write_npz(tmp_path / "env" / "cifar10", fake_dataset(CIFAR_SHAPE))
    monkeypatch.setenv("FLATJAX_DATA_DIR", str(tmp_path / "env"))
    with caplog.at_level(logging.INFO, logger="flatjax.data"):
        data.load_raw("cifar10", download=False)
    assert caplog.messages == [f"cifar10: {tmp_path / 'env' / 'cifar10'} (FLATJAX_DATA_DIR)"]
    caplog.clear()
    fake_tfds(monkeypatch, fake_dataset(FASHION_SHAPE))
    monkeypatch.setitem(data.DEBIAN_FOLDERS, "fashion_mnist", tmp_path / "none")
    with caplog.at_level(logging.INFO, logger="flatjax.data"):
        data.load_raw("fashion_mnist", download=False)
    assert caplog.messages == ["fashion_mnist: TensorFlow Datasets"]


def test_debian_folder_is_used(tmp_path, monkeypatch):
    ds = fake_dataset(FASHION_SHAPE)
    debian = write_fashion_idx(tmp_path / "usr-share-datasets" / "fashion-mnist", ds)
    monkeypatch.setitem(data.DEBIAN_FOLDERS, "fashion_mnist", debian)
    (tmp_path / "empty").mkdir()
    assert_same(data.load_raw("fashion_mnist", tmp_path / "empty", download=False), ds)


def fake_tfds(monkeypatch, ds=None, error=None):
    calls = []

    def load(name, **kwargs):
        calls.append((name, kwargs))
        if error:
            raise error
        return [(ds.x_train, ds.y_train.astype(np.int64)), (ds.x_test, ds.y_test.astype(np.int64))]

    module = types.SimpleNamespace(load=load, as_numpy=lambda tree: tree)
    monkeypatch.setitem(sys.modules, "tensorflow", types.ModuleType("tensorflow"))
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", module)
    return calls


def test_tfds_comes_after_data_dir_and_before_download(tmp_path, monkeypatch):
    tfds_ds, dir_ds = fake_dataset(FASHION_SHAPE, seed=3), fake_dataset(FASHION_SHAPE, seed=4)
    calls = fake_tfds(monkeypatch, tfds_ds)
    assert_same(data.load_raw("fashion_mnist", download=False), tfds_ds)
    assert calls == [("fashion_mnist", dict(split=["train", "test"], batch_size=-1,
                                            as_supervised=True, download=False))]
    write_fashion_idx(tmp_path / "data" / "fashion-mnist", dir_ds)
    assert_same(data.load_raw("fashion_mnist", tmp_path / "data", download=False), dir_ds)
    assert len(calls) == 1


def test_tfds_failure_is_reported(monkeypatch):
    fake_tfds(monkeypatch, error=RuntimeError("no network for tfds"))
    with pytest.raises(FileNotFoundError, match="tfds.load.*no network for tfds"):
        data.load_raw("cifar10", download=False)


def closed_port_url():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def test_missing_everywhere_lists_places_and_remedies(tmp_path, monkeypatch):
    monkeypatch.setenv("FLATJAX_DOWNLOAD_URL", closed_port_url())
    (tmp_path / "data" / "fashion_mnist").mkdir(parents=True)
    with pytest.raises(FileNotFoundError) as error:
        data.load_raw("fashion_mnist", tmp_path / "data")
    message = str(error.value)
    for expected in (f"{tmp_path / 'data' / 'fashion-mnist'} (data_dir): no such folder",
                     f"{tmp_path / 'data' / 'fashion_mnist'} (data_dir): none of the known files",
                     f"{tmp_path / 'no-debian'} (Debian package dataset-fashion-mnist)",
                     "TensorFlow Datasets: skipped, tensorflow is not installed",
                     f"{tmp_path / 'cache' / 'fashion-mnist'} (download cache): downloading http",
                     "--data_dir=DIR", "FLATJAX_DATA_DIR", "train-images-idx3-ubyte.gz",
                     "apt-get install dataset-fashion-mnist"):
        assert expected in message
    assert not [path for path in (tmp_path / "cache").rglob("*") if path.is_file()]

    with pytest.raises(FileNotFoundError, match="data_dir / FLATJAX_DATA_DIR: not set") as error:
        data.load_raw("cifar10", download=False)
    assert "download=False" in str(error.value) and "cifar-10-batches-py" in str(error.value)


# --------------------------------------------------------------------------------------------------
# Download from a local HTTP server


@pytest.fixture
def server(tmp_path):
    """HTTP server on 127.0.0.1 serving tmp_path/served; /partial sends half its promised body."""
    root = tmp_path / "served"
    root.mkdir()
    requests = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):
            requests.append(self.path)
            if self.path == "/partial":
                self.send_response(200)
                self.send_header("Content-Length", "1000")
                self.end_headers()
                self.wfile.write(b"x" * 500)
                self.close_connection = True
                return
            super().do_GET()

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield types.SimpleNamespace(root=root, url=f"http://127.0.0.1:{httpd.server_port}",
                                requests=requests)
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def serve(server, filename, payload, algorithm="sha256"):
    (server.root / filename).write_bytes(payload)
    return f"{algorithm}:{hashlib.new(algorithm, payload).hexdigest()}"


def test_download_file_verifies_and_lands_atomically(tmp_path, server):
    checksum = serve(server, "blob.bin", b"payload" * 1000)
    destination = tmp_path / "cache" / "blob.bin"
    assert data.download_file(f"{server.url}/blob.bin", destination, checksum) == destination
    assert destination.read_bytes() == b"payload" * 1000
    assert os.listdir(destination.parent) == ["blob.bin"]


def test_download_with_wrong_checksum_leaves_nothing(tmp_path, server):
    serve(server, "blob.bin", b"payload")
    destination = tmp_path / "cache" / "blob.bin"
    with pytest.raises(ValueError, match="does not match the expected 00ff"):
        data.download_file(f"{server.url}/blob.bin", destination, "sha256:00ff")
    assert os.listdir(destination.parent) == []


@pytest.mark.parametrize("path, message", [("/partial", "after 500 of 1000 bytes"),
                                           ("/absent", "404")])
def test_interrupted_or_failed_download_leaves_nothing(tmp_path, server, path, message):
    destination = tmp_path / "cache" / "blob.bin"
    with pytest.raises(OSError, match=message):
        data.download_file(f"{server.url}{path}", destination, "sha256:00ff")
    assert os.listdir(destination.parent) == []


def test_load_raw_downloads_fashion_mnist_into_cache(tmp_path, server, monkeypatch):
    ds = fake_dataset(FASHION_SHAPE)
    folder = write_fashion_idx(tmp_path / "made", ds)
    files = tuple((p.name, serve(server, p.name, p.read_bytes())) for p in sorted(folder.iterdir()))
    monkeypatch.setitem(data.REMOTE_FILES, "fashion_mnist", files)
    monkeypatch.setenv("FLATJAX_DOWNLOAD_URL", server.url + "/")
    assert_same(data.load_raw("fashion_mnist"), ds)
    cached = tmp_path / "cache" / "fashion-mnist"
    assert sorted(os.listdir(cached)) == sorted(name for name, _ in files)
    assert len(server.requests) == 4
    data.load_raw("fashion_mnist")
    assert len(server.requests) == 4  # files already in the cache are not fetched again


def test_download_dataset_cifar_archive(tmp_path, server, monkeypatch):
    ds = fake_dataset(CIFAR_SHAPE)
    checksum = serve(server, "cifar-10-python.tar.gz", cifar_tarball(ds), "md5")
    monkeypatch.setitem(data.REMOTE_FILES, "cifar10", (("cifar-10-python.tar.gz", checksum),))
    folder = data.download_dataset("cifar10", tmp_path / "elsewhere", server.url)
    assert os.listdir(folder) == ["cifar-10-python.tar.gz"]
    monkeypatch.setenv("FLATJAX_CACHE_DIR", str(tmp_path / "elsewhere"))
    assert_same(data.load_raw("cifar10", download=False), ds)


def test_load_raw_with_bad_checksum_raises_and_caches_nothing(tmp_path, server, monkeypatch):
    serve(server, "cifar-10-python.tar.gz", b"not the archive")
    monkeypatch.setenv("FLATJAX_DOWNLOAD_URL", server.url)
    with pytest.raises(ValueError, match="md5 checksum"):
        data.load_raw("cifar10")
    assert os.listdir(tmp_path / "cache" / "cifar10") == []


# --------------------------------------------------------------------------------------------------
# Real data (../shared/data), when present

needs_shared = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"no {SHARED_DATA}")


@needs_shared
def test_real_fashion_mnist():
    ds = data.load_raw("fashion_mnist", SHARED_DATA)
    assert ds.x_train.shape == (60000, 28, 28, 1) and ds.x_test.shape == (10000, 28, 28, 1)
    assert ds.y_train.dtype == np.int32
    np.testing.assert_array_equal(np.bincount(ds.y_train), [6000] * 10)
    np.testing.assert_array_equal(np.bincount(ds.y_test), [1000] * 10)
    scaled = ds.x_train / 255.0
    assert scaled.mean() == pytest.approx(0.2860, abs=1e-4)
    assert scaled.std() == pytest.approx(0.3530, abs=1e-4)

    subset = data.load("fashion_mnist", SHARED_DATA, train_subset=1000)
    assert subset.x_train.shape == (1000, 28, 28, 1) and subset.x_test.shape == (10000, 28, 28, 1)
    np.testing.assert_array_equal(subset.y_train, ds.y_train[::60])


@needs_shared
def test_real_cifar10():
    ds = data.load_raw("cifar10", SHARED_DATA)  # one LZMA-compressed npz: several seconds
    assert ds.x_train.shape == (50000, 32, 32, 3) and ds.x_test.shape == (10000, 32, 32, 3)
    assert ds.x_train.dtype == np.uint8 and ds.y_train.dtype == np.int32
    assert tuple(ds.x_train[0, 0, 0]) == (59, 62, 63)
    np.testing.assert_array_equal(np.bincount(ds.y_train), [5000] * 10)
    np.testing.assert_allclose(ds.x_train.mean(axis=(0, 1, 2)) / 255, (0.4914, 0.4822, 0.4465),
                               atol=1e-4)


def test_data_dir_that_is_not_a_folder_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        data.load_raw("fashion_mnist", tmp_path / "typo")
