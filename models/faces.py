"""Face detection and alignment for `models.predict` on raw photos.

Detectors (their weights ship inside the installed package; nothing is downloaded at run time):

- ``"mtcnn"`` (default): facenet-pytorch's MTCNN; boxes, scores and 5 landmarks (eye, eye, nose tip,
  mouth corner, mouth corner; left to right in the image). Finds frontal, turned and tilted faces.
- ``"haar"``: OpenCV's frontal-face Haar cascade (``haarcascade_frontalface_default.xml``), the
  detector of DAN's official demo; boxes only. Needs ``opencv-python-headless<5`` (OpenCV 5 dropped
  the cascades).

Alignment to each model's input:

- APViT: a similarity transform (rotation, uniform scale, shift) that maps the 5 landmarks onto
  the 112 x 112 ArcFace / face.evoLVe template its IR-50 backbone was trained on; without landmarks,
  the square around the box.
- DAN: the square around the box (side = the box's longer side x (1 + margin)) resized to 224 x 224;
  the official demo crops the Haar box (already square) and resizes it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image

DETECTORS = ("mtcnn", "haar")

# The 5-point template of insightface's ArcFace and face.evoLVe's IR-50 (face.evoLVe's 96 x 112
# reference points shifted 8 px right for the square 112 x 112 crop): left eye, right eye, nose,
# left mouth corner, right mouth corner, (x, y) in pixels with pixel centres at integers.
FACE_TEMPLATE_112 = np.array([
    [38.2946, 51.6963],
    [73.5318, 51.5014],
    [56.0252, 71.7366],
    [41.5493, 92.3655],
    [70.7299, 92.2041],
])
TEMPLATE_SIZE = 112
DAN_CROP_MARGIN = 0.0  # extra side, as a fraction of the box's longer side, around DAN's crop


@dataclass
class Face:
    """One detected face, in the photo's pixel coordinates.

    box: (x0, y0, x1, y1), in the landmarks' coordinates (pixel centres at integers); score: the detector's confidence (None for Haar); landmarks: 5 (x, y)
    points (eyes, nose, mouth corners, left to right in the image), or None when the detector gives none.
    """

    box: tuple
    score: Optional[float] = None
    landmarks: Optional[list] = None

    def to_json(self) -> dict:
        return {"box": [round(float(v), 2) for v in self.box],
                "detector_score": None if self.score is None else round(float(self.score), 5),
                "landmarks": None if self.landmarks is None else [[round(float(x), 2), round(float(y), 2)]
                                                                   for x, y in self.landmarks]}


class FaceDetector:
    """`detector(image: PIL RGB) -> list[Face]`, largest face first.

    Args:
        name: "mtcnn" or "haar".
        device: torch device for MTCNN.
        min_face_size: smallest face side in pixels to look for.
        threshold: MTCNN's minimum face probability (its last stage), 0..1.
    """

    def __init__(self, name: str = "mtcnn", device="cpu", min_face_size: int = 20, threshold: float = 0.9):
        if name not in DETECTORS:
            raise ValueError(f"detector: must be one of {DETECTORS}, got {name!r}")
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"detector threshold: must be in [0, 1], got {threshold}")
        self.name, self.threshold, self.min_face_size = name, threshold, int(min_face_size)
        if name == "mtcnn":
            try:
                from facenet_pytorch import MTCNN
            except ImportError as exc:
                raise ImportError(
                    "detector 'mtcnn' needs the facenet-pytorch package (its MTCNN weights ship inside it): "
                    "pip install --no-deps facenet-pytorch==2.6.0 requests  (or use --no-detect on cropped faces)"
                ) from exc
            self._mtcnn = MTCNN(keep_all=True, device=torch.device(device), min_face_size=self.min_face_size,
                                thresholds=[0.6, 0.7, threshold])
        else:
            try:
                import cv2
            except ImportError as exc:
                raise ImportError("detector 'haar' needs OpenCV: pip install 'opencv-python-headless<5'") from exc
            if not hasattr(cv2, "CascadeClassifier"):
                raise ImportError(f"detector 'haar': OpenCV {cv2.__version__} has no Haar cascades (removed in "
                                  "OpenCV 5): pip install 'opencv-python-headless<5'")
            self._cv2 = cv2
            self._cascade = cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_frontalface_default.xml")
            if self._cascade.empty():
                raise RuntimeError("detector 'haar': OpenCV's haarcascade_frontalface_default.xml did not load")

    def __call__(self, image: Image.Image) -> list:
        rgb = np.asarray(image.convert("RGB"))
        if self.name == "mtcnn":
            with torch.no_grad():
                boxes, probs, points = self._mtcnn.detect(rgb, landmarks=True)
            if boxes is None:
                return []
            # facenet-pytorch returns object arrays under numpy 2: make them float.
            boxes, probs, points = (np.asarray(a, dtype=np.float64) for a in (boxes, probs, points))
            faces = [Face(tuple(float(v) for v in b), float(p), [(float(x), float(y)) for x, y in lm])
                     for b, p, lm in zip(boxes, probs, points)]
        else:
            grey = self._cv2.cvtColor(rgb, self._cv2.COLOR_RGB2GRAY)
            found = self._cascade.detectMultiScale(grey, minSize=(self.min_face_size, self.min_face_size))
            faces = [Face((float(x), float(y), float(x + w), float(y + h))) for x, y, w, h in found]
        return sorted(faces, key=lambda f: -(f.box[2] - f.box[0]) * (f.box[3] - f.box[1]))


# ---------------------------------------------------------------------------------------------
# alignment
# ---------------------------------------------------------------------------------------------

def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The 2 x 3 least-squares similarity transform (rotation, uniform scale, shift; no reflection)
    mapping points `src` [N, 2] onto `dst` [N, 2] (Umeyama 1991, as skimage / insightface)."""
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 2 or src.shape[0] < 2:
        raise ValueError(f"landmarks: need matching [N >= 2, 2] point sets, got {src.shape} and {dst.shape}")
    src_mean, dst_mean = src.mean(0), dst.mean(0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    cov = dst_c.T @ src_c / len(src)
    u, s, vt = np.linalg.svd(cov)
    d = np.ones(2)
    if np.linalg.det(cov) < 0:
        d[1] = -1.0
    rotation = u @ np.diag(d) @ vt
    var = (src_c ** 2).sum() / len(src)
    if var == 0:
        raise ValueError("landmarks: all points coincide; no transform fits them")
    scale = (s * d).sum() / var
    shift = dst_mean - scale * rotation @ src_mean
    return np.hstack([scale * rotation, shift[:, None]])


def warp_affine(image: Image.Image, matrix: np.ndarray, size: int) -> Image.Image:
    """`size` x `size` output whose pixel (x, y) samples `image` at matrix @ (x, y, 1), bilinear,
    pixel centres at integer coordinates (cv2.warpAffine's convention with WARP_INVERSE_MAP)."""
    a, b, c = matrix[0]
    d, e, f = matrix[1]
    # PIL puts pixel centres at +0.5 in both images: shift in, apply, shift back.
    c_pil = c + 0.5 - 0.5 * (a + b)
    f_pil = f + 0.5 - 0.5 * (d + e)
    return image.transform((size, size), Image.AFFINE, (a, b, c_pil, d, e, f_pil), resample=Image.BILINEAR,
                           fillcolor=(0, 0, 0))


def square_box(box: Sequence[float], margin: float = 0.0) -> tuple:
    """The square with the box's centre and side = longer side x (1 + margin), (x0, y0, x1, y1)."""
    x0, y0, x1, y1 = (float(v) for v in box)
    side = max(x1 - x0, y1 - y0) * (1.0 + margin)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    return (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)


def template_transform(landmarks, size: int = TEMPLATE_SIZE) -> np.ndarray:
    """2 x 3 matrix from the `size` x `size` template's pixels to the photo's (for `warp_affine`)."""
    template = FACE_TEMPLATE_112 * (size / TEMPLATE_SIZE)
    return similarity_transform(template, np.asarray(landmarks, np.float64))


def align_face(image: Image.Image, face: Face, model_name: str, size: int, margin: float = DAN_CROP_MARGIN):
    """The model input for one face as a `size` x `size` PIL image, and the 2 x 3 matrix mapping its
    pixels to the photo's (to draw overlays back onto the photo).

    apvit: landmarks -> the ArcFace template (scaled to `size`); no landmarks -> square box crop.
    dan: the square box crop with `margin` (the official demo's crop of the Haar box)."""
    if model_name not in ("apvit", "dan"):
        raise ValueError(f"model: must be 'apvit' or 'dan', got {model_name!r}")
    if model_name == "apvit" and face.landmarks is not None:
        matrix = template_transform(face.landmarks, size)
        return warp_affine(image, matrix, size), matrix
    x0, y0, x1, y1 = square_box(face.box, margin if model_name == "dan" else 0.0)
    scale = (x1 - x0) / size
    # the crop's outer edges (-0.5 and size - 0.5) land on the square's edges; past the photo: black
    matrix = np.array([[scale, 0.0, x0 + 0.5 * scale], [0.0, scale, y0 + 0.5 * scale]])
    return warp_affine(image, matrix, size), matrix


def map_points(matrix: np.ndarray, points) -> np.ndarray:
    """Apply a 2 x 3 matrix to [N, 2] points."""
    points = np.asarray(points, np.float64).reshape(-1, 2)
    return points @ matrix[:, :2].T + matrix[:, 2]
