"""Reloading a finished run without Ray: rebuild its network(s) from the run folder, read inputs of the
shape they were trained on, apply the run's standardisation and predict.

Every strategy leaves model.pt in the run folder (ray_train/run/outputs.py: the network of the best
validation epoch, with its input shape, classes and class names or regression targets, and the
standardisation); an ensemble leaves ensemble.json and members/member_<k>/model.pt, combined by
the vote (classes) or the weighted average of the members' outputs (regression).

Inputs (``read_inputs``): .npy arrays, .npz files (x, or x_test; with y / y_test as labels), IDX
files (raw or gzipped), PNG and JPEG images, and folders of images (a sub-folder named after a class
labels the images in it). Every mistake is a UserError naming the file.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import numpy as np

from ray_train.errors import UserError

ENSEMBLE_FILE = "ensemble.json"  # an ensemble run's members and weights (written by its runner)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
PNG_MAGIC, JPEG_MAGIC = b"\x89PNG", b"\xff\xd8"


@dataclass
class Predictor:
    """A run's network(s), ready to predict on the driver's CPU."""

    run_dir: str
    models: list  # eval-mode nn.Modules: one, or the ensemble members that vote
    weights: np.ndarray  # one per model (an ensemble's member weights; 1.0 for a single network)
    standardize: list  # per model: {"mean", "std"} tensors or None
    input_shape: tuple
    num_classes: int | None
    class_names: list | None
    regression: bool
    target_shape: tuple
    config: dict  # run.json's config
    members: list = field(default_factory=list)  # an ensemble's voting member entries (ensemble.json)

    @property
    def ensemble(self) -> bool:
        return bool(self.members)

    def name_of(self, label: int) -> str:
        return self.class_names[label] if self.class_names else str(label)

    def outputs(self, x: np.ndarray, batch_size: int = 1000) -> np.ndarray:
        """Every model's outputs on inputs ``x``, float32 [models, n, ...]: softmax probabilities, or
        for regression the predictions (shaped like the targets)."""
        import torch

        from ray_train.worker.batches import to_tensor

        out = []
        with torch.no_grad():
            for model, stats in zip(self.models, self.standardize):
                parts = []
                for s in range(0, len(x), batch_size):
                    t = to_tensor(x[s : s + batch_size])
                    if stats is not None:
                        t = (t - stats["mean"]) / stats["std"]
                    z = model(t).float()
                    parts.append(z.reshape(len(t), *self.target_shape).numpy() if self.regression
                                 else torch.softmax(z, dim=1).numpy())
                out.append(np.concatenate(parts) if parts else
                           np.empty((0,) + (self.target_shape if self.regression else (self.num_classes,)), np.float32))
        return np.stack(out)


# -- loading a run --------------------------------------------------------------------------------
def load_run(run_dir: str, model=None, file: str = "model.pt") -> Predictor:
    """The run in ``run_dir``: its model.pt (``file``: model-last.pt for the final network), or an
    ensemble's voting members. ``model``: a zero-argument factory of the network, needed only for
    a run that trained a Python callable handed to fit (its architecture is not in the folder)."""
    from ray_train.run import storage
    from ray_train.run.checkpoint import RUN_FILE, load_checked

    storage.check(run_dir)
    if not storage.isdir(run_dir):
        raise UserError(f"--run: no such run folder: {run_dir}")
    try:
        config = json.loads(storage.read_bytes(os.path.join(run_dir, RUN_FILE)))["config"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"--run: {run_dir} is not a run folder (no readable {RUN_FILE}: {exc})") from None
    members, weights, paths = [], None, [os.path.join(run_dir, file)]
    if storage.isfile(os.path.join(run_dir, ENSEMBLE_FILE)):
        try:
            info = json.loads(storage.read_bytes(os.path.join(run_dir, ENSEMBLE_FILE)))
            members = [m for m in info["members"] if m["status"] == "ok"]
            weights = np.asarray([w for m, w in zip(info["members"], _member_weights(info)) if m["status"] == "ok"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise UserError(f"--run: {run_dir} has an unreadable {ENSEMBLE_FILE} ({exc})") from None
        if not members:
            raise UserError(f"--run: {run_dir} has no ensemble member that finished training")
        paths = [os.path.join(run_dir, m["path"]) for m in members]
    for path in paths:
        if not storage.isfile(path):
            raise UserError(f"--run: {run_dir} holds no {os.path.relpath(path, run_dir)}: the run did not finish "
                            "(resume it with --resume) or the file was removed")
    states = [load_checked(p) for p in paths]
    first = states[0]
    regression = bool(first.get("regression", False))
    models = [_network(s, config, model, run_dir) for s in states]
    return Predictor(run_dir, models, np.ones(len(models)) if weights is None else weights,
                     [s.get("standardize") for s in states], tuple(first.get("input_shape", (1, 28, 28))),
                     None if regression else int(first.get("num_classes") or 10), first.get("class_names"),
                     regression, tuple(first.get("target_shape", ())), config, members)


def _member_weights(info: dict) -> list:
    # ensemble.json's weights are those of the voting members, in order
    ok = [m for m in info["members"] if m["status"] == "ok"]
    it = iter(info["weights"])
    return [next(it) if m in ok else 0.0 for m in info["members"]]


def _network(state: dict, config: dict, factory, run_dir: str):
    from models import ImportedFactory, build_model

    name = state.get("spec", {}).get("model") or state.get("model_name") or config["model"]["name"]
    if factory is not None:
        from models.staged import whole_network

        net = whole_network(factory())  # a list of stage modules is the network they make in a line
    elif name == "custom":
        raise UserError(f"--run: {run_dir} trained a Python callable handed to ray_train.fit(model=...); its "
                        "architecture is not in the run folder: predict from Python with "
                        "ray_train.predict(run_dir, inputs, model=<the same callable>)")
    elif ":" in name:
        net = ImportedFactory(name)()
    else:
        dropout = state["spec"]["dropout"] if "spec" in state else config["model"].get("dropout")
        outputs = int(np.prod(state.get("target_shape") or [1])) if state.get("regression") else state.get("num_classes", 10)
        net = build_model(name, dropout=dropout, input_shape=tuple(state.get("input_shape", (1, 28, 28))),
                          num_classes=outputs, init=config["model"].get("init", "scaled"))
    try:
        net.load_state_dict(state["model"])
    except (RuntimeError, KeyError) as exc:
        raise UserError(f"--run: {run_dir}'s network does not match the weights in model.pt "
                        f"({str(exc).splitlines()[0]})") from None
    return net.eval()


# -- reading inputs -------------------------------------------------------------------------------
@dataclass
class Inputs:
    x: np.ndarray  # [n, *input_shape], uint8 pixels or float32
    names: list  # one per example: "file.png", "x.npy[3]"
    labels: np.ndarray | None = None  # class indices or regression targets, where the inputs carry them


def read_inputs(paths: list[str], input_shape: tuple, class_names: list | None = None) -> Inputs:
    """Every input in ``paths`` (files or folders), fitted to ``input_shape``, in order."""
    parts = [_read_one(p, input_shape, class_names) for p in paths]
    if not parts:
        raise UserError("no inputs given")
    mixed = len({q.x.dtype for q in parts}) > 1  # pixels beside floats: pixels scaled as in training
    xs = [p.x.astype(np.float32) / 255.0 if mixed and p.x.dtype == np.uint8 else p.x for p in parts]
    have = [p.labels is not None for p in parts]
    labels = np.concatenate([p.labels for p in parts]) if all(have) else None
    return Inputs(np.concatenate(xs), [n for p in parts for n in p.names], labels)


def _read_one(path: str, shape: tuple, class_names) -> Inputs:
    if os.path.isdir(path):
        return _read_folder(path, shape, class_names)
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file or folder")
    with open(path, "rb") as fh:
        head = fh.read(4)
    if head.startswith(PNG_MAGIC) or head.startswith(JPEG_MAGIC) or path.lower().endswith(IMAGE_EXTENSIONS):
        return Inputs(_read_image(path, shape)[None], [os.path.basename(path)])
    labels = None
    if path.endswith(".npz"):
        x, labels = _read_npz(path)
    elif path.endswith(".npy"):
        x = _load_npy(path, f"{path}: not")
    else:
        from ray_train.data.loaders import read_idx

        try:
            x = read_idx(path)
        except UserError as exc:
            raise UserError(f"{str(exc).split('; ')[0]}; expected a .npy or .npz array, an IDX file, or PNG or "
                            "JPEG images") from None
    x = fit_shape(x, shape, path)
    if labels is not None and len(labels) != len(x):
        raise UserError(f"{path}: {len(x)} inputs but {len(labels)} labels")
    base = os.path.basename(path)
    return Inputs(x, [f"{base}[{i}]" for i in range(len(x))], labels)


def _load_npy(path: str, what: str) -> np.ndarray:
    """A .npy array; ``what`` starts the one-line error ("<what> a readable .npy array (...)")."""
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise UserError(f"{what} a readable .npy array ({exc})") from None


def _read_npz(path: str):
    try:
        with np.load(path, allow_pickle=False) as npz:
            keys = npz.files
            xkey = next((k for k in ("x", "x_test", "images", "inputs") if k in keys), keys[0] if len(keys) == 1 else None)
            if xkey is None:
                raise UserError(f"{path}: holds {', '.join(keys) or 'nothing'}; expected an array named x (or "
                                "x_test), with labels y (or y_test) if you have them")
            ykey = next((k for k in ("y", "y_test", "labels", "targets") if k in keys), None)
            return npz[xkey], (npz[ykey] if ykey else None)
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: not a readable .npz file ({exc})") from None


def fit_shape(x: np.ndarray, shape: tuple, path: str) -> np.ndarray:
    """``x`` as [n, *shape]: already so, one example without the batch axis, flattened examples,
    or images channels-last ([n, H, W, C]) or without their single channel ([n, H, W])."""
    if not (x.dtype == np.uint8 or np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise UserError(f"{path}: holds {x.dtype} values, not numbers")
    shape, size = tuple(shape), int(np.prod(shape))
    if x.shape == shape:
        x = x[None]
    if x.shape[1:] == shape:
        pass
    elif x.ndim == 2 and x.shape[1] == size:
        x = x.reshape((len(x),) + shape)
    elif len(shape) == 3 and x.ndim == 4 and x.shape[1:] == (shape[1], shape[2], shape[0]):
        x = x.transpose(0, 3, 1, 2)
    elif len(shape) == 3 and shape[0] == 1 and x.shape[1:] == shape[1:]:
        x = x[:, None]
    else:
        extra = (f", [N, {size}] flattened or [N, {shape[1]}, {shape[2]}, {shape[0]}] channels-last"
                 if len(shape) == 3 else f" or [N, {size}] flattened")
        raise UserError(f"{path}: holds an array of shape {list(x.shape)}; the run's model takes inputs of shape "
                        f"[N, {', '.join(map(str, shape))}]{extra}")
    if np.issubdtype(x.dtype, np.integer) and x.size and x.min() >= 0 and x.max() <= 255:
        x = x.astype(np.uint8)  # integer pixels: scaled to [0, 1] as uint8 pixels are in training
    if x.dtype == np.uint8:
        return np.ascontiguousarray(x)
    return np.ascontiguousarray(x, dtype=np.float32)


def _read_image(path: str, shape: tuple) -> np.ndarray:
    """A PNG or JPEG as uint8 [C, H, W] for a run trained on images of ``shape``."""
    if len(shape) != 3 or shape[0] not in (1, 3, 4):
        raise UserError(f"{path}: an image, but the run's model takes inputs of shape {list(shape)}, not images "
                        "[C, H, W] with 1, 3 or 4 channels; give a .npy array")
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img = img.convert({1: "L", 3: "RGB", 4: "RGBA"}[shape[0]])
            pixels = np.asarray(img, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise UserError(f"{path}: not a readable PNG or JPEG image ({exc})") from None
    if pixels.shape[:2] != tuple(shape[1:]):
        raise UserError(f"{path}: the image is {pixels.shape[1]}x{pixels.shape[0]} pixels; the run's model takes "
                        f"{shape[2]}x{shape[1]} (resize it first)")
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)


def _read_folder(path: str, shape: tuple, class_names) -> Inputs:
    """The images in ``path``, sorted; images in a sub-folder named after a class (or a class
    index) carry that label when every image does."""
    files, labels = [], []
    for entry in sorted(os.listdir(path)):
        full = os.path.join(path, entry)
        if os.path.isfile(full) and entry.lower().endswith(IMAGE_EXTENSIONS):
            files.append((full, entry, None))
        elif os.path.isdir(full):
            label = _class_of(entry, class_names)
            files += [(os.path.join(full, f), f"{entry}/{f}", label) for f in sorted(os.listdir(full))
                      if f.lower().endswith(IMAGE_EXTENSIONS)]
    if not files:
        raise UserError(f"{path}: the folder holds no PNG or JPEG image")
    x = np.stack([_read_image(f, shape) for f, _, _ in files])
    labels = [lab for _, _, lab in files]
    return Inputs(x, [n for _, n, _ in files], None if None in labels else np.asarray(labels, dtype=np.int64))


def _class_of(folder: str, class_names) -> int | None:
    if class_names and folder in class_names:
        return list(class_names).index(folder)
    return int(folder) if folder.isdigit() else None


def read_labels(path: str, n: int, class_names: list | None, regression: bool) -> np.ndarray:
    """Labels for ``n`` inputs from a .npy, an IDX label file or a text file (one label a line:
    class indices or names; regression: numbers)."""
    if not os.path.isfile(path):
        raise UserError(f"--labels: file not found: {path}")
    if path.endswith(".npy"):
        y = _load_npy(path, f"--labels: {path} is not")
    else:
        with open(path, "rb") as fh:
            head = fh.read(3)
        if head == b"\x00\x00\x08" or head[:2] == b"\x1f\x8b":
            from ray_train.data.loaders import read_idx

            y = read_idx(path)
        else:
            with open(path, encoding="utf-8", errors="replace") as fh:
                words = [w.strip() for w in fh.read().replace(",", "\n").splitlines() if w.strip()]
            y = np.asarray([_label_word(w, class_names, regression, path) for w in words])
    if len(y) != n:
        raise UserError(f"--labels: {path} holds {len(y)} labels for {n} inputs")
    return y.astype(np.float32 if regression else np.int64)


def _label_word(word: str, class_names, regression: bool, path: str):
    if class_names and word in class_names:
        return list(class_names).index(word)
    try:
        return float(word) if regression else int(word)
    except ValueError:
        raise UserError(f"--labels: {path}: {word!r} is neither a class index nor one of the run's class names"
                        + (f" ({', '.join(class_names)})" if class_names else "")) from None
