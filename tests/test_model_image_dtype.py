"""Models take float images normalised as their transforms make them; uint8 (0-255) and other
non-float images are rejected with one error naming the expected dtype and range."""
import pytest
import torch

from models import APViT, DAN
from models.apvit import IMAGE_MEAN, IMAGE_STD

TINY_APVIT = dict(embed_dim=16, num_heads=2, mlp_ratio=2, backbone_units=(1, 1, 1), input_size=32,
                  keep_patches=3, keep_rates=(1, 0.5))


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return {"APViT": APViT(**TINY_APVIT).eval(), "DAN": DAN().eval()}


@pytest.mark.parametrize("name", ["APViT", "DAN"])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64, torch.bool])
def test_non_float_images_raise_one_clear_error(models, name, dtype):
    images = torch.randint(0, 256, (2, 3, 32, 32)).to(dtype)
    pattern = (rf"{name}: images must be a floating-point tensor .*\(pixel / 255 - mean\) / std .*"
               rf"values in \[-2\.12, 2\.64\]\), got {dtype}")
    with pytest.raises(ValueError, match=pattern):
        models[name](images)
    if name == "DAN":
        with pytest.raises(ValueError, match=pattern):
            models[name].spatial_attention(images)


@pytest.mark.parametrize("name", ["APViT", "DAN"])
def test_the_conversion_the_error_names_gives_the_transform_result(models, name):
    """The recipe in the message ((images / 255 - mean) / std) is what ToTensor + Normalize do."""
    from PIL import Image
    from models.recipes import eval_transform

    model = models[name]
    size = model.input_size  # no resize: the transform's output is the pixels, normalised
    pixels = torch.randint(0, 256, (size, size, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    via_transform = eval_transform(model)(Image.fromarray(pixels.numpy()))
    mean, std = torch.tensor(IMAGE_MEAN)[:, None, None], torch.tensor(IMAGE_STD)[:, None, None]
    via_message = (pixels.permute(2, 0, 1) / 255 - mean) / std
    torch.testing.assert_close(via_message, via_transform)
    with torch.no_grad():
        out = model(via_message[None])
    logits = out[0] if isinstance(out, tuple) else out
    assert logits.shape == (1, 7) and logits.isfinite().all()
