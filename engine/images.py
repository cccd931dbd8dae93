"""Image preprocessing for the Pixtral encoder, with Pillow (no torchvision), per the real rules:
keep aspect, fit the longest edge to 1540 px, round each side up to a multiple of 28, bicubic,
RGB over white, rescale and normalise with CLIP mean/std; tokens: rows of [IMG]*w + [IMG_BREAK],
the last break replaced by [IMG_END].
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.errors import InputError

MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
IMG, IMG_BREAK, IMG_END = 10, 12, 13
MAX_IMAGE_PIXELS = 200_000_000  # beyond this Pillow's decoder could exhaust memory


@dataclass(frozen=True)
class PreparedImage:
    pixels: np.ndarray  # [3, H, W] float32, normalised
    grid: tuple[int, int]  # (height tokens, width tokens)

    @property
    def tokens(self) -> list[int]:
        h, w = self.grid
        ids = ([IMG] * w + [IMG_BREAK]) * h
        ids[-1] = IMG_END
        return ids


def token_grid(width: int, height: int, max_size: int = 1540, cell: int = 28) -> tuple[int, int]:
    """(height tokens, width tokens) for an image, as mistral-common computes them."""
    ratio = max(height / max_size, width / max_size)
    if ratio > 1:
        width, height = max(round(width / ratio), 1), max(round(height / ratio), 1)
    return (height - 1) // cell + 1, (width - 1) // cell + 1


def num_image_tokens(width: int, height: int) -> int:
    h, w = token_grid(width, height)
    return h * (w + 1)


def open_image(path: Path):
    """Open and fully decode an image file, or raise InputError with what to do."""
    from PIL import Image, UnidentifiedImageError

    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(path)
            img.load()
    except FileNotFoundError as exc:
        raise InputError(f"The image {path} no longer exists. Attach it again.") from exc
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InputError(
            f"{Path(path).name} is not an image Quire can read (PNG, JPEG, WebP, TIFF, BMP), or it "
            "is too large to decode safely. Convert it to PNG or JPEG and attach it again."
        ) from exc
    except (OSError, ValueError, SyntaxError) as exc:
        raise InputError(
            f"{Path(path).name} could not be decoded ({exc}); the file is damaged. "
            "Attach another copy of the image."
        ) from exc
    return img


def prepare_image(source) -> PreparedImage:
    """From an image file path or an already decoded PIL image (e.g. a rendered PDF page)."""
    from PIL import Image

    img = source if isinstance(source, Image.Image) else open_image(Path(source))
    if img.mode in ("RGBA", "LA", "P"):
        img = img.convert("RGBA")
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, img)
    img = img.convert("RGB")
    gh, gw = token_grid(*img.size)
    img = img.resize((gw * 28, gh * 28), Image.Resampling.BICUBIC)
    arr = np.asarray(img, dtype=np.float32) / 255.0  # [H, W, 3]
    arr = (arr - MEAN) / STD
    return PreparedImage(np.ascontiguousarray(arr.transpose(2, 0, 1)), (gh, gw))
