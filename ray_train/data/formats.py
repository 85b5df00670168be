"""The streamed formats (docs/data.md): ``images:DIR`` (class-per-folder PNG/JPEG), ``parquet:PATH``
(a file, a folder or any URI pyarrow and Ray Data read) and ray.data Datasets handed to
``ray_train.fit(data=Streams(...))``. Each becomes a StreamData after checks the driver can make
without reading the inputs whole: folders, classes, image headers and sizes, columns and labels.
Every mistake is a DataError naming the folder, file or column (exit 2, before any actor starts)."""
from __future__ import annotations

import dataclasses
import math
import os

import numpy as np

from ray_train.data.streams import StreamData, Streams, labels_array, quiet_context, standardized
from ray_train.errors import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
SPLITS = ("train", "test", "val")
FEATURE_COLUMNS = ("image", "x", "features", "pixels")
LABEL_COLUMNS = ("label", "y", "labels", "target")
SPLIT_VALUES = {"train": ("train",), "test": ("test",), "val": ("val", "validation")}


def load_stream(cfg, streams: Streams | None = None) -> StreamData:
    """The StreamData ``cfg`` (DataConfig) names, or the user's ``streams``. Ray starts first: a
    ray.data Dataset made without it would join whatever cluster ``ray start`` left running."""
    from ray_train.cluster import init_ray

    init_ray()
    if streams is not None:
        data = from_streams(streams)
    elif cfg.dataset.startswith("images:"):
        data = image_folder(os.path.expanduser(cfg.dataset[len("images:"):]), parse_size(cfg.image_size))
    else:
        data = parquet(cfg.dataset[len("parquet:"):], cfg)
    if cfg.validation == 0:
        data = dataclasses.replace(data, splits={k: v for k, v in data.splits.items() if k != "val"}, y_val=None)
    elif cfg.validation is not None:
        raise DataError(f"data.validation: a streamed dataset takes its validation split from its own data "
                        f"(DIR/val, a 'val' split value, fit's val=), not a share of {cfg.validation:g}; leave "
                        "--validation unset or give 0")
    if cfg.expand and len(data.input_shape) != 3:
        raise DataError(f"data.expand: the 1-pixel shifts need images [C, H, W]; {data.name}'s inputs are "
                        f"{list(data.input_shape)}")
    data = dataclasses.replace(data, expand=cfg.expand, shuffle_buffer=cfg.shuffle_buffer, cache_share=cfg.stream_cache)
    if cfg.standardize:  # one pass over the training split, streamed through the driver
        data = standardized(data)
    return data


def parse_size(text: str | None) -> tuple[int, int] | None:
    return None if text is None else tuple(int(v) for v in str(text).split(","))


# -- images:DIR ----------------------------------------------------------------------------------
def image_folder(root: str, size: tuple[int, int] | None) -> StreamData:
    import ray.data

    layout = "DIR/train/<class>/*.png and DIR/test/<class>/*.png (JPEG too; DIR/val optional)"
    if not os.path.isdir(root):
        raise DataError(f"images:{root}: folder not found; it must hold {layout}")
    files, classes = {}, None
    for split in SPLITS:
        folder = os.path.join(root, split)
        if not os.path.isdir(folder):
            if split == "val":
                continue
            raise DataError(f"images:{root}: no {split}/ folder; it must hold {layout}")
        found = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))
        if not found:
            raise DataError(f"images:{folder}: no class folders; it must hold one folder of images per class")
        if classes is None:
            classes = tuple(found)
        unseen = [c for c in found if c not in classes]
        if unseen:
            raise DataError(f"images:{os.path.join(folder, unseen[0])}: class {unseen[0]!r} is not among the training "
                            f"classes ({', '.join(classes)})")
        files[split] = []
        for c in found:
            names = sorted(f for f in os.listdir(os.path.join(folder, c)) if f.lower().endswith(IMAGE_EXTENSIONS))
            if not names:
                raise DataError(f"images:{os.path.join(folder, c)}: an empty class folder (no PNG or JPEG images)")
            files[split] += [os.path.join(folder, c, f) for f in names]
    mode, shape = _check_headers([p for split in files.values() for p in split], size, root)
    height, width = size or shape
    channels = 1 if mode == "L" else 3
    index = {c: i for i, c in enumerate(classes)}
    labels = {s: np.array([index[os.path.basename(os.path.dirname(p))] for p in ps], dtype=np.int64)
              for s, ps in files.items()}
    quiet_context()
    splits = {s: ray.data.read_images(ps, mode=mode, size=size, include_paths=True) for s, ps in files.items()}
    head = np.stack([_decode(p, mode, (height, width)) for p in files["test"][:2]])
    head = head[:, None] if head.ndim == 3 else head.transpose(0, 3, 1, 2)
    return StreamData(os.path.basename(os.path.normpath(root)), splits, "image", None, labels["train"], labels["test"],
                      labels.get("val"), (channels, height, width), np.ascontiguousarray(head), len(classes), classes,
                      layout="hwc")


def _check_headers(paths: list[str], size, root: str) -> tuple[str, tuple[int, int]]:
    """Every file opens as an image (its header; a file broken further in fails when read, naming
    the split); one size unless ``size`` resizes. Returns ("L" or "RGB", (height, width))."""
    from PIL import Image

    sizes, gray = {}, True
    for p in paths:
        try:
            with Image.open(p) as im:
                sizes.setdefault(im.size, p)
                gray = gray and im.mode in ("1", "L", "I", "I;16", "F")
        except Exception as exc:
            raise DataError(f"images:{p}: not a readable PNG or JPEG image ({type(exc).__name__})") from None
    if len(sizes) > 1 and size is None:
        (a, pa), (b, pb) = list(sizes.items())[:2]
        raise DataError(f"images:{root}: images of different sizes ({a[0]}x{a[1]} in {pa}, {b[0]}x{b[1]} in {pb}); "
                        "give --image-size H,W to resize them all")
    width, height = next(iter(sizes))
    return ("L" if gray else "RGB"), (height, width)


def _decode(path: str, mode: str, size: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert(mode)
        if im.size != (size[1], size[0]):
            im = im.resize((size[1], size[0]))
        return np.asarray(im, dtype=np.uint8)


# -- parquet:PATH --------------------------------------------------------------------------------
def parquet(path: str, cfg) -> StreamData:
    import ray.data
    from ray.data.expressions import col

    quiet_context()  # imports ray.data, which registers its tensor column types with pyarrow
    train_src = _table_source(path)
    names = list(train_src.schema.names)
    feature = _column(cfg.feature_column, FEATURE_COLUMNS, names, path, "feature", "--feature-column")
    label = _column(cfg.label_column, LABEL_COLUMNS, names, path, "label", "--label-column")
    columns = [feature, label]
    sources = {"train": (path, train_src)}
    if cfg.test_path is not None:
        test_src = _table_source(cfg.test_path)
        missing = [c for c in columns if c not in test_src.schema.names]
        if missing:
            raise DataError(f"parquet:{cfg.test_path}: no column {missing[0]!r}; the columns are "
                            f"{', '.join(test_src.schema.names)}")
        sources["test"] = (cfg.test_path, test_src)
    split_col = cfg.split_column
    if split_col is not None and split_col not in names:
        raise DataError(f"parquet:{path}: no split column {split_col!r}; the columns are {', '.join(names)}")
    if split_col is None and cfg.test_path is None:
        raise DataError(f"parquet:{path}: no test split; give --test-path PATH or --split-column NAME (values "
                        "train, test and optionally val)")
    labels, splits = {}, {}
    for split in SPLITS:
        if split == "test" and cfg.test_path is not None:
            where, src, filtered = cfg.test_path, test_src, False
        elif split_col is not None:
            where, src, filtered = path, train_src, True
        elif split == "train":
            where, src, filtered = path, train_src, False
        else:
            continue
        table = src.to_table(columns=[label] + ([split_col] if filtered else []))
        y = table.column(label).to_numpy(zero_copy_only=False)
        ds = ray.data.read_parquet(where).select_columns(columns + ([split_col] if filtered else []))
        if filtered:
            wanted = np.isin(table.column(split_col).to_numpy(zero_copy_only=False).astype(str), SPLIT_VALUES[split])
            if not wanted.any():
                if split == "val":
                    continue
                raise DataError(f"parquet:{path}: no rows with {split_col} = {split!r}")
            y = y[wanted]
            ds = ds.filter(expr=col(split_col).is_in(list(SPLIT_VALUES[split])))
        labels[split] = labels_array(f"parquet:{where} column {label!r}", y)
        if not len(labels[split]):
            raise DataError(f"parquet:{where}: no rows")
        splits[split] = ds
    head, shape, layout = _head(sources.get("test", sources["train"])[1], feature, cfg.image_size, path)
    top = max(int(y.max()) for y in labels.values())
    return StreamData(os.path.splitext(os.path.basename(os.path.normpath(path)))[0] or "parquet", splits, feature, label,
                      labels["train"], labels["test"], labels.get("val"), shape, head, top + 1, layout=layout)


def _table_source(path: str):
    import pyarrow.dataset as pads

    try:
        return pads.dataset(os.path.expanduser(path), format="parquet")
    except Exception as exc:
        raise DataError(f"parquet:{path}: cannot read it as parquet ({' '.join(str(exc).split())[:200]})") from None


def _column(given: str | None, defaults: tuple[str, ...], names: list[str], path: str, what: str, flag: str) -> str:
    if given is not None and given in names:
        return given
    if given is None:
        for name in defaults:
            if name in names:
                return name
    asked = repr(given) if given else f"named {', '.join(defaults)}"
    raise DataError(f"parquet:{path}: no {what} column {asked}; the columns are {', '.join(names)}: name it with {flag}")


def _head(src, feature: str, image_size, path: str) -> tuple[np.ndarray, tuple[int, ...], str]:
    """Two inputs, the input shape the replicas reshape to, and the layout."""
    col = src.head(2, columns=[feature]).column(feature).combine_chunks()
    arr = col.to_numpy_ndarray() if hasattr(col, "to_numpy_ndarray") else np.asarray(col.to_pylist())
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number)):
        raise DataError(f"parquet:{path}: feature column {feature!r} holds {col.type}; it must hold numbers "
                        "(a list or tensor of numbers per row)")
    arr = arr if arr.dtype == np.uint8 else arr.astype(np.float32)
    if arr.ndim == 2:  # flat rows: images when the size says so or the length is a square
        length = arr.shape[1]
        size = parse_size(image_size)
        if size and length % (size[0] * size[1]) == 0:
            shape = (length // (size[0] * size[1]),) + size
        elif math.isqrt(length) ** 2 == length:
            shape = (1, math.isqrt(length), math.isqrt(length))
        else:
            shape = (length,)
        return arr.reshape((len(arr),) + shape), shape, "array"
    return arr, tuple(arr.shape[1:]), "array"


# -- ray.data Datasets handed to fit -------------------------------------------------------------
def from_streams(s: Streams) -> StreamData:
    from ray_train.worker.stream import inputs_of

    quiet_context()
    splits = {"train": s.train, "test": s.test, **({"val": s.val} if s.val is not None else {})}
    labels = {}
    for split, ds in splits.items():
        names = list(ds.schema().names)
        for column, what in ((s.feature, "feature"), (s.label, "label")):
            if column not in names:
                raise DataError(f"data: the {split} dataset has no {what} column {column!r}; its columns are "
                                f"{', '.join(names)}")
        parts = [b[s.label] for b in ds.select_columns([s.label]).iter_batches(batch_size=8192, batch_format="numpy")]
        labels[split] = labels_array(f"data: the {split} dataset's column {s.label!r}",
                                     np.concatenate(parts) if parts else np.empty(0, np.int64))
        if not len(labels[split]):
            raise DataError(f"data: the {split} dataset is empty")
    batch = s.test.take_batch(2, batch_format="numpy")
    if s.transform is not None:
        batch = s.transform(batch)
    x = np.stack(list(batch[s.feature])) if batch[s.feature].dtype == object else np.asarray(batch[s.feature])
    layout = "hwc" if x.dtype == np.uint8 and (x.ndim == 3 or (x.ndim == 4 and x.shape[-1] in (1, 3)
                                                               and x.shape[1] not in (1, 3))) else "array"
    shape = ((1,) + x.shape[1:] if x.ndim == 3 else (x.shape[3],) + x.shape[1:3]) if layout == "hwc" else x.shape[1:]
    top = max(int(y.max()) for y in labels.values())
    num_classes = len(s.classes) if s.classes else top + 1
    if top >= num_classes:
        raise DataError(f"data: label {top} is out of range for {num_classes} classes")
    data = StreamData(s.name, splits, s.feature, s.label, labels["train"], labels["test"], labels.get("val"),
                      tuple(shape), np.empty(0), num_classes, tuple(s.classes) if s.classes else None, layout=layout,
                      transform=s.transform, train_transform=s.train_transform)
    return dataclasses.replace(data, head=inputs_of(data, batch))
