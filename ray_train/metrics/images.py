"""Pictures for TensorBoard: the confusion matrix and a grid of misclassified images, rendered
with matplotlib's Agg canvas (no pyplot: ensemble members render from several threads)."""
from __future__ import annotations

import math

import numpy as np


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    m = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(m, (y_true, y_pred), 1)
    return m


def render(draw, width: float, height: float, dpi: int = 80) -> np.ndarray:
    """An RGB uint8 HWC image of what ``draw(figure)`` puts on a fresh matplotlib Figure. No pyplot:
    ensemble members render from several threads at once."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=dpi)
    canvas = FigureCanvasAgg(fig)
    draw(fig)
    fig.tight_layout()
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def confusion_image(matrix: np.ndarray) -> np.ndarray:
    """The confusion matrix rendered as an RGB uint8 HWC image."""

    def draw(fig):
        ax = fig.add_subplot()
        ax.imshow(matrix, cmap="Blues")
        for (i, j), v in np.ndenumerate(matrix):
            if v:
                ax.text(j, i, str(v), ha="center", va="center", fontsize=7,
                        color="white" if v > matrix.max() / 2 else "black")
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_xticks(range(len(matrix)))
        ax.set_yticks(range(len(matrix)))

    return render(draw, 5, 5)


def is_image(x: np.ndarray) -> bool:
    """Images [N, C, H, W] with one or three channels: data error_grid can draw."""
    return x.ndim == 4 and x.shape[1] in (1, 3)


def error_grid(images: np.ndarray, labels: np.ndarray, voted: np.ndarray, votes: np.ndarray) -> np.ndarray:
    """The misclassified images as an RGB HWC image: each titled true -> voted, members' votes below."""
    cols = 8
    rows = max(1, math.ceil(len(images) / cols))

    def draw(fig):
        for i in range(rows * cols):
            ax = fig.add_subplot(rows, cols, i + 1)
            ax.axis("off")
            if i < len(images):
                img = np.asarray(images[i], dtype=np.float32)
                img = img[0] if img.shape[0] == 1 else np.moveaxis(img, 0, -1) / max(float(img.max()), 1e-9)
                ax.imshow(img, cmap="gray_r")
                ax.set_title(f"{labels[i]}->{voted[i]}\n{''.join(map(str, votes[:, i]))}", fontsize=7)

    return render(draw, cols * 1.3, rows * 1.55)
