"""The image tensors the models take: what they must be, checked once for APViT and DAN."""
import torch


def check_image_dtype(model_name: str, images, mean, std) -> None:
    """Models take float images normalised as their transforms make them; uint8 0-255 images (or
    any other non-float tensor) are rejected rather than converted: a bare conversion would skip
    the normalisation, and the model would classify garbage without a word."""
    if isinstance(images, torch.Tensor) and not images.is_floating_point():
        low = min((0 - m) / s for m, s in zip(mean, std))
        high = max((1 - m) / s for m, s in zip(mean, std))
        raise ValueError(
            f"{model_name}: images must be a floating-point tensor (float32, float16 or bfloat16) normalised "
            f"per channel as (pixel / 255 - mean) / std with mean {tuple(mean)} and std {tuple(std)} "
            f"(values in [{low:.2f}, {high:.2f}]), got {images.dtype}; for uint8 0-255 images use "
            f"(images / 255 - mean) / std, or models.recipes.eval_transform(model) on PIL images"
        )
