"""Dataset files read without trusting them: CIFAR-10's pickled batches without running code, Fashion-MNIST's IDX
files checked against their own headers.

CIFAR-10's python version is a set of pickles. ``pickle.load`` runs whatever a file names (``os.system`` and the
like), so torchvision checks each file's md5 first; a loader that accepts files other than the official ones (the
tests' small synthetic batches) must not unpickle them freely. :func:`read_cifar_pickle` uses an unpickler that
resolves exactly the globals a CIFAR batch needs to rebuild its numpy array and refuses every other one, before
anything is called. The md5 sums torchvision publishes are checked as well, to tell official files from others.

An IDX file (MNIST, Fashion-MNIST) states its type and dimensions in its header, so a truncated or padded copy
is recognised from its size alone: :func:`idx_problem`.

A folder dataset's images are sized from their headers before a pixel is decoded (:func:`image_header`: a 219 KB
PNG may declare 15000x15000 pixels, 2 GB decoded), and its class names, which need not be valid folder names
(Fashion-MNIST's ``T-shirt/top``), come from a small text or JSON file (:func:`read_class_names`).
"""

from __future__ import annotations

import hashlib
import json
import pickle
import re
import struct
import warnings
from pathlib import Path
from typing import Any

import numpy as np

try:  # where numpy >= 2 keeps the function that CIFAR's pickles name as numpy.core.multiarray._reconstruct
    from numpy._core.multiarray import _reconstruct
except ImportError:  # numpy 1.x
    from numpy.core.multiarray import _reconstruct

# torchvision's published md5 sums of the extracted cifar-10-python.tar.gz (datasets.CIFAR10.train_list, test_list,
# meta); repeated here because reading them from torchvision would tie this module to its class layout.
CIFAR10_MD5 = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
    "batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
}
# Every global a CIFAR-10 batch refers to (a dict of bytes, ints, lists and one uint8 array): the array is rebuilt
# by numpy's _reconstruct from ndarray and a dtype. numpy 1.x wrote the first name, numpy >= 2 the second.
_CIFAR_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}
IDX_MAGIC = {0x00000803: "images", 0x00000801: "labels"}  # unsigned bytes, 3 or 1 dimensions


class BadDatasetFile(ValueError):
    """A dataset file that is not what it should be; the message names the file and what is wrong with it."""


class ImageTooLarge(BadDatasetFile):
    """An image whose header declares more pixels than allowed (`image_header`); nothing of it was decoded."""


class _CifarUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return _CIFAR_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"it refers to {module}.{name}, which no CIFAR-10 batch does") from None


def md5sum(path: Path) -> str:
    """The md5 hex digest of a file, read in 1 MiB blocks."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_cifar_pickle(path: Path) -> dict[str, Any]:
    """Unpickle one file of CIFAR-10's python version (a batch or ``batches.meta``) without running its code.

    Keys and strings come back as ``str`` (latin-1, like torchvision). Only numpy's array reconstruction may be
    called; a pickle naming anything else (``os.system``, ``builtins.eval``, ...) raises BadDatasetFile before any
    of it runs, as do truncated or garbled files and anything that is not a dict.
    """
    try:
        with open(path, "rb") as f:
            content = _CifarUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, struct.error) as err:
        raise BadDatasetFile(f"{path} is not a CIFAR-10 file: {err}") from None
    if not isinstance(content, dict):
        raise BadDatasetFile(f"{path} is not a CIFAR-10 file: it holds a {type(content).__name__}, not a dict")
    return content


def check_cifar_batch(path: Path, batch: dict[str, Any]) -> tuple[np.ndarray, list[int]]:
    """The images (N, 3072) uint8 and labels (N ints in 0..9) of a batch read by :func:`read_cifar_pickle`;
    BadDatasetFile when the batch lacks them or they disagree."""
    data, labels = batch.get("data"), batch.get("labels", batch.get("fine_labels"))
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        what = f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise BadDatasetFile(f"{path}: 'data' should be a uint8 array of shape (N, 3072), not a {what}")
    if not isinstance(labels, list) or not all(type(y) is int and 0 <= y <= 9 for y in labels):
        raise BadDatasetFile(f"{path}: 'labels' should be a list of ints in 0..9")
    if len(labels) != len(data):
        raise BadDatasetFile(f"{path}: {len(data)} images but {len(labels)} labels")
    return data, labels


def check_cifar_meta(path: Path, meta: dict[str, Any]) -> list[str]:
    """The 10 class names of ``batches.meta`` read by :func:`read_cifar_pickle`; BadDatasetFile otherwise."""
    names = meta.get("label_names")
    if not isinstance(names, list) or len(names) != 10 or not all(isinstance(n, str) for n in names):
        raise BadDatasetFile(f"{path}: 'label_names' should be a list of 10 class names")
    return names


def idx_problem(path: Path, kind: str, image_size: int = 28) -> str | None:
    """What is wrong with the IDX file at `path`, or None when it is complete.

    `kind` is ``"images"`` (magic 0x803, dimensions N x image_size x image_size) or ``"labels"`` (magic 0x801,
    dimension N); the file must hold exactly its header plus the product of its dimensions in bytes.
    """
    if not path.is_file():
        return "it is missing"
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(4)
        if len(head) < 4:
            return f"it has {size} bytes, too few for an IDX header"
        magic = struct.unpack(">I", head)[0]
        if IDX_MAGIC.get(magic) != kind:
            return f"its magic number is 0x{magic:08x}, not that of IDX {kind} (0x{_magic_of(kind):08x})"
        ndim = magic & 0xFF
        dims_bytes = f.read(4 * ndim)
    if len(dims_bytes) < 4 * ndim:
        return f"it has {size} bytes, too few for its IDX header"
    dims = struct.unpack(f">{ndim}I", dims_bytes)
    if kind == "images" and dims[1:] != (image_size, image_size):
        return f"its images are {dims[1]}x{dims[2]}, not {image_size}x{image_size}"
    expected = 4 + 4 * ndim + int(np.prod(dims, dtype=np.int64))
    if size != expected:
        state = "truncated" if size < expected else "longer than its header says"
        return f"it is {state}: {size} bytes, its header ({' x '.join(map(str, dims))}) needs {expected}"
    return None


def idx_count(path: Path) -> int:
    """The first dimension (number of items) of an IDX file that :func:`idx_problem` accepted."""
    with open(path, "rb") as f:
        return struct.unpack(">4xI", f.read(8))[0]


def _magic_of(kind: str) -> int:
    return next(magic for magic, name in IDX_MAGIC.items() if name == kind)


# ---------------------------------------------------------------------------------------------- image folders

CLASS_FILE_LIMIT = 1 << 20  # bytes: a class list is a few names, not a data file


def image_header(path: Path, max_pixels: int) -> tuple[int, int]:
    """(width, height) that the PNG or JPEG at `path` declares, read from its header without decoding a pixel
    (PIL's ``Image.open`` is lazy). ImageTooLarge when width x height exceeds `max_pixels` (PIL's own
    decompression-bomb refusal, from 2 x ``PIL.Image.MAX_IMAGE_PIXELS`` pixels, is reported the same way);
    BadDatasetFile when PIL reads no PNG or JPEG header."""
    from PIL import Image

    try:
        with warnings.catch_warnings():  # PIL warns from MAX_IMAGE_PIXELS on: the limit here is the one that counts
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path, formats=("PNG", "JPEG")) as image:
                width, height = image.size
    except Image.DecompressionBombError as err:
        found = re.search(r"\((\d+) pixels\)", str(err))
        raise ImageTooLarge(f"{path} declares {found.group(1) if found else 'more'} pixels, more than the "
                            f"{max_pixels} allowed") from None
    except Image.UnidentifiedImageError:
        raise BadDatasetFile(f"{path} is not a PNG or JPEG file (no PNG or JPEG header)") from None
    except (OSError, SyntaxError, ValueError, IndexError, TypeError, struct.error, EOFError) as err:
        problem = str(err).splitlines()[0][:120] if str(err).strip() else type(err).__name__
        raise BadDatasetFile(f"{path} has no readable PNG or JPEG header ({problem})") from None
    if width * height > max_pixels:
        raise ImageTooLarge(f"{path} declares {width}x{height} = {width * height} pixels, more than the "
                            f"{max_pixels} allowed")
    return width, height


def read_class_names(path: Path) -> tuple[str, ...]:
    """The class names listed in `path`, in class-index order: ``classes.txt`` (UTF-8, one name per line, blank
    lines only at the end, spaces around a name ignored) or ``classes.json`` (a JSON list of strings).
    BadDatasetFile for a file that is too large (1 MiB), not UTF-8 or not such a list, or lists an empty name
    or a name twice."""
    size = path.stat().st_size
    if size > CLASS_FILE_LIMIT:
        raise BadDatasetFile(f"{path} has {size} bytes, more than a class list needs ({CLASS_FILE_LIMIT})")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise BadDatasetFile(f"{path} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    if path.suffix == ".json":
        try:
            names = json.loads(text)
        except json.JSONDecodeError as err:
            raise BadDatasetFile(f"{path} is not valid JSON ({err.msg} at line {err.lineno})") from None
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise BadDatasetFile(f"{path} must hold a JSON list of class names (strings), e.g. [\"cat\", \"dog\"]")
        names = [n.strip() for n in names]
        where = [f"entry {i}" for i in range(len(names))]
    else:
        lines = text.splitlines()
        while lines and not lines[-1].strip():
            lines.pop()
        names = [line.strip() for line in lines]
        where = [f"line {i + 1}" for i in range(len(names))]
    if not names:
        raise BadDatasetFile(f"{path} lists no class")
    for i, name in enumerate(names):
        if not name:
            raise BadDatasetFile(f"{path}: {where[i]} is empty (class {i} needs a name; the order of the entries "
                                 f"is the order of the classifier's outputs)")
        if names.index(name) != i:
            raise BadDatasetFile(f"{path} lists class {name!r} twice ({where[names.index(name)]} and {where[i]})")
    return tuple(names)
