"""Faces in real photos: detection (MTCNN), alignment to each model's input, image modes, and
`models.predict` end to end on scikit-image's sample photos (the astronaut Eileen Collins: one face;
the cameraman: one turned face; the cat Chelsea: no human face)."""
import json
import math
import os
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from models import build_model, faces, predict
from models import data as fer_data
from models.classes import APVIT_RAFDB_CLASSES, DAN_RAFDB_CLASSES

skimage_data = pytest.importorskip("skimage.data")
pytest.importorskip("facenet_pytorch", reason="the MTCNN detector (facenet-pytorch) is not installed")

# APViT at its real 112 x 112 input (the aligned crop), with a narrow ViT and one IR unit per stage.
SMALL_APVIT = {"embed_dim": 16, "num_heads": 2, "mlp_ratio": 2, "backbone_units": [1, 1, 1], "keep_patches": 150,
               "keep_rates": [1, 0.5]}
# Where the astronaut's face is (x0, y0, x1, y1), by eye; the detected box must lie within these margins.
ASTRONAUT_FACE = (180, 60, 268, 172)


@pytest.fixture(scope="module")
def astronaut():
    return Image.fromarray(skimage_data.astronaut())


@pytest.fixture(scope="module")
def detector():
    return faces.FaceDetector("mtcnn")


@pytest.fixture(scope="module")
def astronaut_face(detector, astronaut):
    found = detector(astronaut)
    assert len(found) == 1
    return found[0]


def test_mtcnn_finds_the_astronaut_face_with_landmarks(astronaut_face):
    face = astronaut_face
    for got, want in zip(face.box, ASTRONAUT_FACE):
        assert abs(got - want) < 12, (face.box, ASTRONAUT_FACE)
    assert face.score > 0.99
    (lx, ly), (rx, ry), (nx, ny), (mlx, mly), (mrx, mry) = face.landmarks
    assert lx < nx < rx and mlx < mrx and max(ly, ry) < ny < min(mly, mry)  # eyes, nose, mouth in order
    x0, y0, x1, y1 = face.box
    assert all(x0 < x < x1 and y0 < y < y1 for x, y in face.landmarks)
    record = face.to_json()
    assert len(record["box"]) == 4 and len(record["landmarks"]) == 5
    json.dumps(record)  # plain floats


def test_mtcnn_finds_a_turned_face_and_no_face_on_a_cat(detector):
    camera = Image.fromarray(skimage_data.camera())  # greyscale
    assert len(detector(camera)) == 1
    assert detector(Image.fromarray(skimage_data.chelsea())) == []


def test_unknown_detector_is_rejected():
    with pytest.raises(ValueError, match="detector: must be one of"):
        faces.FaceDetector("yolo")


def _rotation(degrees, scale, shift):
    a = math.radians(degrees)
    return np.array([[scale * math.cos(a), -scale * math.sin(a), shift[0]],
                     [scale * math.sin(a), scale * math.cos(a), shift[1]]])


def test_similarity_transform_recovers_a_known_transform():
    matrix = _rotation(-23.0, 1.7, (40.0, -12.0))
    points = faces.map_points(matrix, faces.FACE_TEMPLATE_112)
    np.testing.assert_allclose(faces.similarity_transform(faces.FACE_TEMPLATE_112, points), matrix, atol=1e-9)
    mirrored = points * [-1, 1]  # a reflection is not a similarity: the fit must stay a rotation
    fit = faces.similarity_transform(faces.FACE_TEMPLATE_112, mirrored)
    assert np.linalg.det(fit[:, :2]) > 0
    with pytest.raises(ValueError, match="landmarks"):
        faces.similarity_transform(np.zeros((5, 2)), points)


def test_alignment_moves_the_landmarks_onto_the_template():
    """Bright dots at rotated, scaled landmark positions land on the 112 x 112 template's points."""
    matrix = _rotation(25.0, 2.3, (150.0, 60.0))  # template -> photo
    landmarks = faces.map_points(matrix, faces.FACE_TEMPLATE_112)
    photo = np.zeros((420, 400, 3), np.uint8)
    for x, y in np.rint(landmarks).astype(int):
        photo[y - 2:y + 3, x - 2:x + 3] = 255
    face = faces.Face((0, 0, 400, 420), 1.0, [tuple(p) for p in landmarks])
    crop, crop_to_photo = faces.align_face(Image.fromarray(photo), face, "apvit", 112)
    assert crop.size == (112, 112)
    np.testing.assert_allclose(crop_to_photo, matrix, atol=1e-6)
    grey = np.asarray(crop.convert("L")).astype(float)
    for x, y in faces.FACE_TEMPLATE_112:
        window = grey[round(y) - 1:round(y) + 2, round(x) - 1:round(x) + 2]
        assert window.max() > 120, (x, y)
    assert grey.mean() < 20  # and nothing else is bright


def test_alignment_gives_each_model_its_input(astronaut, astronaut_face):
    apvit_crop, apvit_matrix = faces.align_face(astronaut, astronaut_face, "apvit", 112)
    dan_crop, dan_matrix = faces.align_face(astronaut, astronaut_face, "dan", 224)
    assert apvit_crop.size == (112, 112) and dan_crop.size == (224, 224)
    # the eyes land on the template's eye row (within the landmark fit's residual)
    eyes = faces.map_points(np.linalg.inv(np.vstack([apvit_matrix, [0, 0, 1]]))[:2], astronaut_face.landmarks[:2])
    np.testing.assert_allclose(eyes, faces.FACE_TEMPLATE_112[:2], atol=4)
    # DAN: the square around the box, its centre at the box's centre
    x0, y0, x1, y1 = astronaut_face.box
    corners = faces.map_points(dan_matrix, [[-0.5, -0.5], [223.5, 223.5]])
    side = max(x1 - x0, y1 - y0)
    np.testing.assert_allclose(corners.mean(0), [(x0 + x1) / 2, (y0 + y1) / 2], atol=1e-6)
    np.testing.assert_allclose(corners[1] - corners[0], [side, side], atol=1e-6)
    # without landmarks APViT falls back to the square box crop
    boxed = faces.Face(astronaut_face.box)
    crop, matrix = faces.align_face(astronaut, boxed, "apvit", 112)
    assert crop.size == (112, 112) and matrix[0, 1] == 0
    with pytest.raises(ValueError, match="model"):
        faces.align_face(astronaut, boxed, "resnet", 112)


def _write_png16(path, values):
    """A 16-bit PNG (greyscale [H, W] or RGB [H, W, 3]); PIL cannot write 16-bit RGB itself."""
    values = np.asarray(values, dtype=">u2")
    height, width = values.shape[:2]

    def chunk(kind, payload):
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, 16, 2 if values.ndim == 3 else 0, 0, 0, 0)
    rows = b"".join(b"\x00" + values[y].tobytes() for y in range(height))
    with open(path, "wb") as fh:
        fh.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def test_load_image_handles_orientation_transparency_and_16_bit(tmp_path):
    # EXIF orientation 6 (rotate 90 degrees clockwise to view): a 40 x 20 file is shown 20 x 40
    img = Image.new("RGB", (40, 20), (200, 10, 10))
    exif = img.getexif()
    exif[0x0112] = 6
    img.save(tmp_path / "rotated.jpg", exif=exif)
    assert fer_data.load_image(str(tmp_path / "rotated.jpg")).size == (20, 40)
    # transparent pixels become white, opaque ones keep their colour
    rgba = Image.new("RGBA", (2, 1), (0, 0, 0, 0))
    rgba.putpixel((1, 0), (10, 20, 30, 255))
    rgba.save(tmp_path / "alpha.png")
    assert np.asarray(fer_data.load_image(str(tmp_path / "alpha.png"))).tolist() == [[[255, 255, 255], [10, 20, 30]]]
    # 16-bit greyscale is scaled to 8 bits (not clipped to white)
    _write_png16(tmp_path / "grey16.png", [[0, 32896, 65535]])
    assert Image.open(tmp_path / "grey16.png").mode.startswith("I")
    assert np.asarray(fer_data.load_image(str(tmp_path / "grey16.png")))[0, :, 0].tolist() == [0, 128, 255]
    _write_png16(tmp_path / "rgb16.png", [[[65535, 32896, 0]]])
    assert np.asarray(fer_data.load_image(str(tmp_path / "rgb16.png"))).tolist() == [[[255, 128, 0]]]
    Image.new("L", (3, 2), 77).save(tmp_path / "grey.png")
    image = fer_data.load_image(str(tmp_path / "grey.png"))
    assert image.mode == "RGB" and np.asarray(image).max() == 77


@pytest.fixture(scope="module")
def photos(tmp_path_factory, astronaut):
    folder = tmp_path_factory.mktemp("photos")
    astronaut.save(folder / "astronaut.jpg")
    Image.fromarray(skimage_data.chelsea()).save(folder / "chelsea.jpg")
    return [str(folder / "astronaut.jpg"), str(folder / "chelsea.jpg")]


@pytest.mark.parametrize("name", ["apvit", "dan"])
def test_predict_on_photos(name, photos, tmp_path):
    """Random weights in the official checkpoint layout: one entry per face with box and class, an
    explicit entry for the photo without a face, and the annotated photos."""
    torch.manual_seed(0)
    if name == "apvit":
        checkpoint = {"state_dict": build_model("apvit", **SMALL_APVIT).state_dict()}
        extra, classes, panels = ["--model-kwargs", json.dumps(SMALL_APVIT)], APVIT_RAFDB_CLASSES, 2
    else:
        checkpoint = {"model_state_dict": build_model("dan").official_state_dict()}
        extra, classes, panels = [], DAN_RAFDB_CLASSES, 4
    torch.save(checkpoint, tmp_path / "model.pth")
    results = predict.main(["--model", name, "--checkpoint", str(tmp_path / "model.pth"), "--device", "cpu", *extra,
                            "--json", str(tmp_path / "out.json"), "--annotate", str(tmp_path / "annotated"),
                            "--attention-out", str(tmp_path / "attention"), *photos])
    assert json.loads((tmp_path / "out.json").read_text()) == results
    assert [r["path"] for r in results] == photos
    face, cat = results
    assert face["face"] == 0 and face["label"] in classes and list(face["probabilities"]) == list(classes)
    assert sum(face["probabilities"].values()) == pytest.approx(1, abs=1e-5)
    assert all(abs(a - b) < 12 for a, b in zip(face["box"], ASTRONAUT_FACE)) and len(face["landmarks"]) == 5
    assert cat["status"] == "no face found" and cat["face"] is None and cat["label"] is None
    annotated = sorted(os.listdir(tmp_path / "annotated"))
    assert annotated == ["00000_astronaut_faces.png", "00001_chelsea_faces.png"]
    drawn = Image.open(tmp_path / "annotated" / annotated[0])
    assert drawn.size == (512, 512)
    # the box is drawn in green where the photo is not
    x0, y0, x1, y1 = (round(v) for v in face["box"])
    assert drawn.getpixel((x0, (y0 + y1) // 2)) == (0, 255, 0)
    assert os.listdir(tmp_path / "attention") == ["00000_astronaut_face0_attention.png"]
    crop_overlay = Image.open(tmp_path / "attention" / "00000_astronaut_face0_attention.png")
    # APViT: a panel for patch pooling and one for token pooling; DAN: one per head; a caption above
    assert crop_overlay.size[0] == panels * 224 and crop_overlay.size[1] > 224
