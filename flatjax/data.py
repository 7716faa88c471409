"""CIFAR-10 and Fashion-MNIST as NumPy arrays.

`load_raw` gives uint8 images (NHWC: CIFAR-10 (N, 32, 32, 3), Fashion-MNIST (N, 28, 28, 1)) and
int32 labels; `load` gives the images as float32, x/255 standardized per feature with train
statistics.

Where data is looked for, in this order:

1. `data_dir` (else the `FLATJAX_DATA_DIR` environment variable): a folder holding `cifar10/` and
   `fashion-mnist/` (or `fashion_mnist/`), each in one of the formats below.
2. `/usr/share/datasets/fashion-mnist/`, from Debian's `dataset-fashion-mnist` package.
3. TensorFlow Datasets, when tensorflow is installed.
4. The download cache (`FLATJAX_CACHE_DIR`, default `~/.cache/flatjax`, same layout as a data_dir);
   missing official files are downloaded into it (checksums verified) when `download` is true. The
   base URL can be changed with `FLATJAX_DOWNLOAD_URL`, e.g. to a mirror.

Formats inside a dataset folder:

- Fashion-MNIST: the IDX files `train-images-idx3-ubyte.gz`, `train-labels-idx1-ubyte.gz`,
  `t10k-images-idx3-ubyte.gz` and `t10k-labels-idx1-ubyte.gz`, gzip-compressed or not.
- CIFAR-10: `cifar-10-batches-py/` (python batches), `cifar-10-batches-bin/` (binary batches) or the
  official archive `cifar-10-python.tar.gz`.
- Either: one `.npz` file with uint8 `x_train`, `x_test` (NHWC; Fashion-MNIST may omit the channel
  axis) and integer `y_train`, `y_test`.

Files are read once per process (cached by path); the arrays `load_raw` returns are read-only.
"""

from __future__ import annotations

import codecs
import functools
import gzip
import hashlib
import http.client
import io
import logging
import lzma
import math
import operator
import os
import pickle
import tarfile
import tempfile
import urllib.request
import zipfile
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np
from tqdm import tqdm

__all__ = [
    "DATASETS",
    "Dataset",
    "download_dataset",
    "download_file",
    "load",
    "load_raw",
    "standardize",
    "strided_subset",
]

log = logging.getLogger(__name__)

NUM_CLASSES = 10
IMAGE_SHAPES = {"cifar10": (32, 32, 3), "fashion_mnist": (28, 28, 1)}
DATASETS = tuple(IMAGE_SHAPES)

# Folder names a dataset may have inside a data_dir; the first is used for the download cache.
FOLDERS = {"cifar10": ("cifar10",), "fashion_mnist": ("fashion-mnist", "fashion_mnist")}
DEBIAN_FOLDERS = {"fashion_mnist": Path("/usr/share/datasets/fashion-mnist")}
DEFAULT_CACHE_DIR = "~/.cache/flatjax"

# Official downloads: the base URL, then (file name, "algorithm:hex digest") per file.
# Fashion-MNIST mirror: https://github.com/zalandoresearch/fashion-mnist/raw/master/data/fashion/
BASE_URLS = {
    "fashion_mnist": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "cifar10": "https://www.cs.toronto.edu/~kriz/",
}
REMOTE_FILES = {
    "fashion_mnist": (
        ("train-images-idx3-ubyte.gz",
         "sha256:3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84"),
        ("train-labels-idx1-ubyte.gz",
         "sha256:a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845"),
        ("t10k-images-idx3-ubyte.gz",
         "sha256:346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073"),
        ("t10k-labels-idx1-ubyte.gz",
         "sha256:67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5"),
    ),
    "cifar10": (("cifar-10-python.tar.gz", "md5:c58f30108f718f92721af3b95e74349a"),),
}

_IDX_STEMS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_CIFAR_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_TEST_BATCH = "test_batch"
_NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")

_LAYOUTS = {
    "cifar10": "DIR/cifar10/ holding cifar-10-batches-py/ (python batches), cifar-10-batches-bin/ "
               "(binary batches), cifar-10-python.tar.gz, or one .npz with x_train, y_train, "
               "x_test, y_test",
    "fashion_mnist": "DIR/fashion-mnist/ holding train-images-idx3-ubyte.gz, "
                     "train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz and "
                     "t10k-labels-idx1-ubyte.gz (or the same files uncompressed), or one .npz with "
                     "x_train, y_train, x_test, y_test",
}


class Dataset(NamedTuple):
    """Train and test arrays: images NHWC, labels int32."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


# --------------------------------------------------------------------------------------------------
# Public API


def load(name, data_dir=None, *, train_subset=None, download=True) -> Dataset:
    """Dataset `name` as float32 images standardized per feature (see `standardize`).

    Args:
      name: "cifar10" or "fashion_mnist".
      data_dir: folder holding the dataset folders (see the module docstring); None for the default
        search.
      train_subset: if given, keep only `strided_subset(x_train, y_train, train_subset)`; the
        standardization statistics then come from that subset, the data actually trained on. The
        test set stays whole.
      download: allow downloading the official files into the cache when no other source has them.

    Returns:
      A `Dataset` of new, writable arrays.
    """
    raw = load_raw(name, data_dir, download=download)
    x_train, y_train = raw.x_train, raw.y_train
    if train_subset is not None:
        x_train, y_train = strided_subset(x_train, y_train, train_subset)
    x_train, x_test = standardize(x_train, raw.x_test)
    return Dataset(x_train, np.array(y_train), x_test, np.array(raw.y_test))


def load_raw(name, data_dir=None, *, download=True) -> Dataset:
    """Dataset `name` as read-only uint8 images and int32 labels, from the first source that has it.

    Args:
      name: "cifar10" or "fashion_mnist".
      data_dir: folder holding the dataset folders; default `FLATJAX_DATA_DIR`. The other sources
        (module docstring) are searched after it.
      download: allow downloading the official files into the cache when no other source has them.

    Raises:
      ValueError: unknown name, or a file that is damaged or holds the wrong shapes or labels.
      FileNotFoundError: no source has the data (the message lists every place looked at), or a
        dataset folder lacks some of its files.
    """
    _check_name(name)
    looked = []
    for folder, label in _local_folders(name, data_dir, looked):
        found = _find_format(name, folder)
        if found:
            log.info("%s: %s (%s)", name, folder, label)
            return _read(*found, IMAGE_SHAPES[name])
        looked.append(f"{folder} ({label}): {_why_not(folder)}")

    dataset = _load_tfds(name, download, looked)
    if dataset is not None:
        log.info("%s: TensorFlow Datasets", name)
        return dataset

    cache = _cache_root(None) / FOLDERS[name][0]
    if download:
        try:
            download_dataset(name)
        except OSError as error:
            looked.append(f"{cache} (download cache): {error}")
            raise FileNotFoundError(_missing_message(name, looked)) from error
    found = _find_format(name, cache)
    if found:
        log.info("%s: %s (download cache)", name, cache)
        return _read(*found, IMAGE_SHAPES[name])
    looked.append(f"{cache} (download cache): {_why_not(cache)}, and download=False")
    raise FileNotFoundError(_missing_message(name, looked))


def standardize(x_train_u8, x_test_u8):
    """Both image sets as float32 x/255, standardized per feature with the train mean and std.

    A feature is one pixel in one channel. A feature whose train std is 0 (e.g. a border pixel that
    is always black) is only centered, divided by 1 instead of 0, so the result stays finite.

    Returns:
      (x_train, x_test), float32 arrays of the input shapes.
    """
    mean, std = _feature_stats(x_train_u8)
    return _normalize(x_train_u8, mean, std), _normalize(x_test_u8, mean, std)


def strided_subset(x, y, n):
    """The n examples at indices 0, s, 2s, ..., (n-1)s of (x, y), where s = N // n.

    Returns views, not copies. This is the paper's fixed subset (n=1000 for lambda_max). Raises
    ValueError unless 0 < n <= N.
    """
    n = operator.index(n)
    if len(x) != len(y):
        raise ValueError(f"x has {len(x)} examples but y has {len(y)}")
    if not 0 < n <= len(x):
        raise ValueError(f"subset size must be in 1..{len(x)} (the number of examples), got {n}")
    step = len(x) // n
    return x[: n * step : step], y[: n * step : step]


def download_dataset(name, cache_dir=None, base_url=None) -> Path:
    """Download the official files of `name` that are not in the cache yet; return their folder.

    Args:
      name: "cifar10" or "fashion_mnist".
      cache_dir: cache root; default `FLATJAX_CACHE_DIR`, else ~/.cache/flatjax.
      base_url: where the files are, as base_url/<file name>; default `FLATJAX_DOWNLOAD_URL`, else
        the official site (`BASE_URLS`).

    Raises:
      OSError: the download failed (no network, HTTP error, connection lost).
      ValueError: a file's checksum is wrong (the file is discarded).
    """
    _check_name(name)
    folder = _cache_root(cache_dir) / FOLDERS[name][0]
    base = base_url or os.environ.get("FLATJAX_DOWNLOAD_URL") or BASE_URLS[name]
    for filename, checksum in REMOTE_FILES[name]:
        destination = folder / filename
        if not destination.exists():
            download_file(f"{base.rstrip('/')}/{filename}", destination, checksum)
    return folder


def download_file(url, destination, checksum) -> Path:
    """Download `url` to `destination` if its checksum ("sha256:<hex>", "md5:<hex>", ...) matches.

    The file is written under a temporary name next to `destination` and renamed into place only
    once complete and verified, so an interrupted or bad download never leaves a file under the
    final name.

    Raises:
      OSError: the download failed.
      ValueError: wrong checksum.
    """
    algorithm, _, expected = checksum.partition(":")
    if not expected:
        raise ValueError(f"checksum {checksum!r} should read 'algorithm:hex digest', "
                         "e.g. 'md5:c58f...'")
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(prefix=f".{destination.name}.", suffix=".part",
                                   dir=destination.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            actual = _fetch(url, out, algorithm, destination.name)
        if actual != expected.lower():
            raise ValueError(
                f"{url}: {algorithm} checksum {actual} does not match the expected {expected}; the "
                "download was discarded. Retry, use another mirror (FLATJAX_DOWNLOAD_URL), or put "
                "the files in a data_dir by hand.")
        os.replace(partial, destination)
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise
    return destination


# --------------------------------------------------------------------------------------------------
# Sources


def _check_name(name):
    if name not in IMAGE_SHAPES:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}")


def _local_folders(name, data_dir, looked):
    """(folder, where it comes from) pairs to search first: the data dir's, then Debian's."""
    root, label = data_dir, "data_dir"
    if root is None:
        root, label = os.environ.get("FLATJAX_DATA_DIR"), "FLATJAX_DATA_DIR"
    if root and not Path(root).expanduser().is_dir():
        raise FileNotFoundError(f"{label} {root!r} is not a folder; give the folder that holds "
                                f"{' or '.join(FOLDERS[name])}/ (or leave it unset to search "
                                "the other sources)")
    if root:
        folders = [(Path(root).expanduser() / folder, label) for folder in FOLDERS[name]]
    else:
        folders = []
        looked.append("data_dir / FLATJAX_DATA_DIR: not set")
    if name in DEBIAN_FOLDERS:
        folders.append((DEBIAN_FOLDERS[name], "Debian package dataset-fashion-mnist"))
    return folders


def _cache_root(cache_dir):
    return Path(cache_dir or os.environ.get("FLATJAX_CACHE_DIR") or DEFAULT_CACHE_DIR).expanduser()


def _find_format(name, folder):
    """(format, resolved path) of the first known format of `name` in `folder`, or None."""
    if not folder.is_dir():
        return None
    if name == "fashion_mnist":
        stems = [stem for pair in _IDX_STEMS.values() for stem in pair]
        if any((folder / stem).exists() or (folder / f"{stem}.gz").exists() for stem in stems):
            return "idx", folder.resolve()
    else:
        for fmt, path in (("cifar_python", folder / "cifar-10-batches-py"),
                          ("cifar_binary", folder / "cifar-10-batches-bin"),
                          ("cifar_tar", folder / "cifar-10-python.tar.gz")):
            if path.exists():
                return fmt, path.resolve()
    archives = sorted(folder.glob("*.npz"))
    if len(archives) > 1:
        raise ValueError(f"{folder}: several .npz files ({', '.join(a.name for a in archives)}); "
                         "keep one, or move the others elsewhere")
    return ("npz", archives[0].resolve()) if archives else None


def _why_not(folder):
    return "none of the known files" if folder.is_dir() else "no such folder"


def _load_tfds(name, download, looked):
    """The dataset from TensorFlow Datasets, or None (noted in `looked`) when not available."""
    try:
        import tensorflow  # noqa: F401  (TFDS builders need it)
    except ImportError:
        looked.append("TensorFlow Datasets: skipped, tensorflow is not installed")
        return None
    import tensorflow_datasets as tfds

    try:
        (x_train, y_train), (x_test, y_test) = tfds.as_numpy(tfds.load(
            name, split=["train", "test"], batch_size=-1, as_supervised=True, download=download))
    except Exception as error:  # TFDS reports missing data and network trouble in many ways
        looked.append(f"TensorFlow Datasets: tfds.load({name!r}) failed: {error!r}")
        return None
    where = f"tfds.load({name!r})"
    shape = IMAGE_SHAPES[name]
    train = _checked_split(x_train, y_train, shape, f"{where} train images",
                           f"{where} train labels")
    test = _checked_split(x_test, y_test, shape, f"{where} test images", f"{where} test labels")
    return _read_only(Dataset(*train, *test))


def _missing_message(name, looked):
    ways = [f"pass --data_dir=DIR (data_dir=DIR in Python) or set FLATJAX_DATA_DIR=DIR, with "
            f"{_LAYOUTS[name]}"]
    if name in DEBIAN_FOLDERS:
        ways.append("on Debian or Ubuntu: apt-get install dataset-fashion-mnist")
    ways += ["install tensorflow (pip install 'flatjax[tfds]') so TensorFlow Datasets can fetch it",
             "on a machine with internet, allow the download (download=True, the default) into "
             "FLATJAX_CACHE_DIR (default ~/.cache/flatjax)"]
    return "\n".join([f"no {name} data found. Looked at:", *(f"  - {entry}" for entry in looked),
                      "Provide it in one of these ways:", *(f"  - {way}" for way in ways)])


def _fetch(url, out, algorithm, label):
    """Write the body at `url` to file `out` with a progress bar; return its hex digest."""
    digest = hashlib.new(algorithm, usedforsecurity=False)
    received = 0
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"download {label}") as bar:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    digest.update(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
    except (OSError, http.client.HTTPException) as error:
        raise OSError(f"downloading {url} failed: {error}") from error
    if total is not None and received != total:
        raise OSError(f"downloading {url} failed: connection closed after {received} of {total} "
                      "bytes")
    out.flush()
    os.fsync(out.fileno())
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------------
# Formats


@functools.lru_cache(maxsize=4)
def _read(fmt, path, image_shape) -> Dataset:
    """The dataset stored at `path` in format `fmt`, with read-only arrays."""
    return _read_only(_READERS[fmt](path, image_shape))


def _read_only(dataset):
    for array in dataset:
        array.flags.writeable = False
    return dataset


def _checked_split(x, y, image_shape, x_where, y_where):
    """(x, y) as contiguous uint8 images and int32 labels, once shapes and labels are checked."""
    x, y = np.asarray(x), np.asarray(y)
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != tuple(image_shape):
        raise ValueError(f"{x_where}: images are {x.dtype} of shape {x.shape}, expected uint8 of "
                         f"shape (N, {', '.join(map(str, image_shape))})")
    if y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{y_where}: labels are {y.dtype} of shape {y.shape}, expected {len(x)} "
                         "integers, one per image")
    if y.size and (y.min() < 0 or y.max() >= NUM_CLASSES):
        raise ValueError(f"{y_where}: labels range over {y.min()}..{y.max()}, expected "
                         f"0..{NUM_CLASSES - 1}")
    return np.ascontiguousarray(x), y.astype(np.int32)


def _read_idx_folder(folder, image_shape) -> Dataset:
    """Fashion-MNIST from the four IDX files in `folder`."""
    splits = []
    for images_stem, labels_stem in _IDX_STEMS.values():
        x_path, y_path = _idx_path(folder, images_stem), _idx_path(folder, labels_stem)
        x = _read_idx(x_path, ndim=3)[..., None]
        splits += _checked_split(x, _read_idx(y_path, ndim=1), image_shape, x_path, y_path)
    return Dataset(*splits)


def _idx_path(folder, stem):
    for path in (folder / f"{stem}.gz", folder / stem):
        if path.exists():
            return path
    expected = ", ".join(stem for pair in _IDX_STEMS.values() for stem in pair)
    raise FileNotFoundError(f"{folder}: has Fashion-MNIST files but not {stem}.gz (nor {stem}); "
                            f"expected all of {expected} (each .gz or not)")


def _read_idx(path, ndim):
    """The uint8 array in IDX file `path` (gzip-compressed when the name ends in .gz)."""
    data = path.read_bytes()
    if path.suffix == ".gz":
        try:
            data = gzip.decompress(data)
        except (EOFError, gzip.BadGzipFile, zlib.error) as error:
            raise ValueError(f"{path}: not a complete gzip file ({error}); it is truncated or "
                             "damaged, get it again") from error
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: {len(data)} bytes, shorter than an IDX header ({header} bytes)")
    magic, expected_magic = int.from_bytes(data[:4], "big"), 0x0800 | ndim
    if magic != expected_magic:
        raise ValueError(f"{path}: IDX magic number {magic:#010x}, expected {expected_magic:#010x} "
                         f"(unsigned bytes, {ndim} dimension{'s' * (ndim > 1)})")
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    if len(data) - header != math.prod(shape):
        raise ValueError(f"{path}: header says shape {shape} ({math.prod(shape)} bytes of data) "
                         f"but the file holds {len(data) - header}; it is truncated or damaged")
    return np.frombuffer(data, np.uint8, offset=header).reshape(shape)


def _read_cifar_python(folder, image_shape) -> Dataset:
    """CIFAR-10 from the python batches in `folder` (cifar-10-batches-py)."""
    return _cifar_dataset(
        lambda batch: _cifar_batch_from_pickle(_read_file(folder / batch), folder / batch,
                                               image_shape))


def _read_cifar_binary(folder, image_shape) -> Dataset:
    """CIFAR-10 from the binary batches in `folder` (cifar-10-batches-bin)."""
    return _cifar_dataset(
        lambda batch: _cifar_batch_from_records(_read_file(folder / f"{batch}.bin"),
                                                folder / f"{batch}.bin", image_shape))


def _read_cifar_tar(path, image_shape) -> Dataset:
    """CIFAR-10 from the official archive cifar-10-python.tar.gz, read without extracting it."""
    wanted = {f"cifar-10-batches-py/{b}": b for b in (*_CIFAR_TRAIN_BATCHES, _CIFAR_TEST_BATCH)}
    members = {}
    try:
        with tarfile.open(path, "r:gz") as archive:
            for member in archive:
                if member.name in wanted and member.isfile():
                    members[wanted[member.name]] = archive.extractfile(member).read()
    except (tarfile.TarError, EOFError, zlib.error) as error:
        raise ValueError(f"{path}: not a complete tar.gz archive ({error}); it is truncated or "
                         "damaged, get it again") from error
    missing = [member for member, batch in wanted.items() if batch not in members]
    if missing:
        raise ValueError(f"{path}: lacks {', '.join(missing)}; expected the official "
                         "cifar-10-python.tar.gz")
    return _cifar_dataset(
        lambda batch: _cifar_batch_from_pickle(members[batch], f"{path}:{batch}", image_shape))


def _read_file(path):
    if not path.is_file():
        raise FileNotFoundError(f"{path.parent}: has no {path.name}; expected "
                                f"{', '.join(_CIFAR_TRAIN_BATCHES)} and {_CIFAR_TEST_BATCH}")
    return path.read_bytes()


def _cifar_dataset(read_batch) -> Dataset:
    """The five train batches concatenated and the test batch, each read by `read_batch(name)`."""
    train = [read_batch(batch) for batch in _CIFAR_TRAIN_BATCHES]
    x_test, y_test = read_batch(_CIFAR_TEST_BATCH)
    return Dataset(np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train]),
                   x_test, y_test)


def _cifar_batch_from_pickle(data, where, image_shape):
    """(images, labels) of one CIFAR-10 python batch: a pickled dict with b'data' and b'labels'."""
    try:
        batch = _ArrayUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as error:  # a damaged pickle can fail in many ways
        raise ValueError(f"{where}: cannot read it as a CIFAR-10 python batch ({error!r}); it is "
                         "truncated, damaged or not a CIFAR-10 batch") from error
    if not isinstance(batch, dict) or not {b"data", b"labels"} <= set(batch):
        raise ValueError(f"{where}: expected a pickled dict with keys b'data' and b'labels' "
                         "(a CIFAR-10 python batch)")
    return _cifar_rows_to_split(np.asarray(batch[b"data"]), batch[b"labels"], where, image_shape)


def _cifar_batch_from_records(data, where, image_shape):
    """(images, labels) of one CIFAR-10 binary batch: records of 1 label byte then the pixels."""
    record = 1 + math.prod(image_shape)
    if len(data) % record:
        raise ValueError(f"{where}: {len(data)} bytes is not a whole number of {record}-byte "
                         f"records (1 label byte + {record - 1} pixel bytes); it is truncated or "
                         "damaged")
    records = np.frombuffer(data, np.uint8).reshape(-1, record)
    return _cifar_rows_to_split(records[:, 1:], records[:, 0], where, image_shape)


def _cifar_rows_to_split(rows, labels, where, image_shape):
    """Images from CIFAR rows (all red, then green, then blue pixels), checked with their labels."""
    height, width, channels = image_shape
    if rows.dtype != np.uint8 or rows.ndim != 2 or rows.shape[1] != height * width * channels:
        raise ValueError(f"{where}: pixel rows are {rows.dtype} of shape {rows.shape}, expected "
                         f"uint8 of shape (N, {height * width * channels})")
    images = rows.reshape(-1, channels, height, width).transpose(0, 2, 3, 1)
    return _checked_split(images, labels, image_shape, where, where)


def _pickle_globals():
    """The globals a pickled NumPy array refers to, under the names NumPy 1 and 2 write."""
    array = np.zeros(1)
    objects = (array.__reduce_ex__(2)[0], array.__reduce_ex__(5)[0], np.ndarray, np.dtype)
    allowed = {(module, obj.__name__): obj
               for obj in objects
               for module in (obj.__module__, obj.__module__.replace("numpy._core", "numpy.core"))}
    allowed["_codecs", "encode"] = codecs.encode  # bytes in protocol-2 pickles written by Python 3
    return allowed


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain containers and NumPy arrays only, so a data file cannot run code."""

    _ALLOWED = _pickle_globals()

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only NumPy arrays are "
                                         "expected")
        return self._ALLOWED[module, name]


def _read_npz(path, image_shape) -> Dataset:
    """The dataset in .npz file `path` (arrays x_train, y_train, x_test, y_test)."""
    arrays = _npz_arrays(path)
    missing = [key for key in _NPZ_KEYS if key not in arrays]
    if missing:
        raise ValueError(f"{path}: has no {', '.join(missing)}; expected arrays "
                         f"{', '.join(_NPZ_KEYS)}")
    splits = []
    for split in ("train", "test"):
        x = arrays[f"x_{split}"]
        if x.ndim == len(image_shape) and image_shape[-1] == 1:
            x = x[..., None]
        splits += _checked_split(x, arrays[f"y_{split}"], image_shape, f"{path} (x_{split})",
                                 f"{path} (y_{split})")
    return Dataset(*splits)


def _npz_arrays(path):
    """The arrays of .npz file `path` that `_read_npz` needs, by name."""
    try:
        with np.load(path) as npz:
            return {key: npz[key] for key in _NPZ_KEYS if key in npz.files}
    except (ValueError, EOFError, zipfile.BadZipFile, lzma.LZMAError, zlib.error) as error:
        raise ValueError(f"{path}: cannot read it as an .npz archive ({error}); it is truncated or "
                         "damaged") from error


_READERS = {
    "idx": _read_idx_folder,
    "cifar_python": _read_cifar_python,
    "cifar_binary": _read_cifar_binary,
    "cifar_tar": _read_cifar_tar,
    "npz": _read_npz,
}


# --------------------------------------------------------------------------------------------------
# Standardization


def _feature_stats(x_u8, chunk=4096):
    """Per-feature mean and std of x/255 over the first axis; a std of 0 is replaced by 1."""
    total = np.zeros(x_u8.shape[1:], np.float64)
    total_sq = np.zeros_like(total)
    for start in range(0, len(x_u8), chunk):  # exact integer sums in float64, chunk by chunk
        block = x_u8[start:start + chunk].astype(np.float64)
        total += block.sum(axis=0)
        total_sq += np.square(block).sum(axis=0)
    mean = total / len(x_u8)
    std = np.sqrt(np.maximum(total_sq / len(x_u8) - mean ** 2, 0.0))
    return mean / 255, np.where(std > 0, std / 255, 1.0)


def _normalize(x_u8, mean, std):
    out = x_u8.astype(np.float32)
    out /= 255
    out -= mean.astype(np.float32)
    out /= std.astype(np.float32)
    return out
