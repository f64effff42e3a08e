"""Augmentations on uint8 CHW tensors: each is `prepare` (deterministic centre crop and resize, what
the decoded cache stores) then `augment` (random, training only), the training-only options every
augmentation takes (colour jitter, grayscale, sharpness, noise, RandAugment), batch-wise device
augmentation after the prefetcher, and batch MixUp / CutMix."""
import math
import random

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF

CROP_FRACTION = (320 / 512, 256 / 384)  # the competition's 320x256 centre crop of a 512x384 image


def center_crop_box(height, width, crop_fraction=CROP_FRACTION):
    """(top, left, crop height, crop width) of the centre crop keeping `crop_fraction` of each side."""
    crop_h, crop_w = round(height * crop_fraction[0]), round(width * crop_fraction[1])
    return (height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w


def crop_region(image: torch.Tensor, top, left, side) -> torch.Tensor:
    """image[..., top:top+side, left:left+side] of a CHW tensor, edge-replicated where it leaves the image."""
    height, width = image.shape[-2:]
    rows = torch.arange(top, top + side).clamp_(0, height - 1)
    cols = torch.arange(left, left + side).clamp_(0, width - 1)
    return image[..., rows[:, None], cols[None, :]]


AUTO_AUGMENTS = ("none", "autoaugment", "trivialaugment")


def check_augment_options(color_jitter=0.0, grayscale=0.0, sharpness=0.0, noise=0.0, randaugment=None,
                          auto_augment="none"):
    """Raise ValueError (naming the flag) for an out-of-range augmentation option."""
    if auto_augment not in AUTO_AUGMENTS:
        raise ValueError(f"--auto_augment must be one of {', '.join(AUTO_AUGMENTS)}, got {auto_augment!r}")
    if not 0 <= color_jitter < 1:
        raise ValueError(f"--color_jitter must be in [0, 1), got {color_jitter}")
    if not 0 <= grayscale <= 1:
        raise ValueError(f"--grayscale is a probability in [0, 1], got {grayscale}")
    if sharpness < 0:
        raise ValueError(f"--sharpness must be >= 0, got {sharpness}")
    if not 0 <= noise <= 1:
        raise ValueError(f"--noise is a standard deviation in [0, 1] (of the 0..255 range), got {noise}")
    if randaugment is not None and not (len(randaugment) == 2 and randaugment[0] >= 1 and 0 <= randaugment[1] <= 30):
        raise ValueError(f"--randaugment N M needs N >= 1 operations and magnitude 0 <= M <= 30, got {randaugment}")


class BaseAugmentation:
    """Resize only (the baseline's default). Every augmentation works on uint8 CHW tensors in two
    steps: `prepare` (deterministic: crop and resize; what the decoded cache stores) and `augment`
    (random, training only); calling it does both. `crop_fraction` (height, width) overrides the
    class's centre crop; (1, 1) keeps the whole image. An image may come with a `region` of its own
    (top, left, side: a square, e.g. around its face, found beforehand: `faces.FaceCrop.regions`), which
    is cropped instead of the centre. Every augmentation also takes the optional
    training-only options: `color_jitter` (brightness, contrast and saturation factors in 1 +- S),
    `grayscale` (probability), `sharpness` (factor 1 + S, half the images), `noise` (gaussian, sigma
    as a fraction of 255), `randaugment` ((N, M): torchvision's RandAugment on uint8) and `auto_augment`
    (torchvision's AutoAugment ImageNet policy or TrivialAugmentWide, on uint8)."""
    crop_fraction = None

    def __init__(self, resize=(128, 96), train=True, crop_fraction=None, color_jitter=0.0, grayscale=0.0,
                 sharpness=0.0, noise=0.0, randaugment=None, auto_augment="none"):
        self.resize, self.train = [int(v) for v in resize], train
        if crop_fraction is not None:
            self.crop_fraction = None if tuple(crop_fraction) == (1, 1) else tuple(crop_fraction)
        check_augment_options(color_jitter, grayscale, sharpness, noise, randaugment, auto_augment)
        self.color_jitter, self.grayscale, self.sharpness, self.noise = color_jitter, grayscale, sharpness, noise
        from torchvision.transforms import v2
        self.randaugment = None
        if randaugment:
            self.randaugment = v2.RandAugment(num_ops=int(randaugment[0]), magnitude=int(randaugment[1]))
        self.auto_augment = {"none": None, "autoaugment": v2.AutoAugment,
                             "trivialaugment": v2.TrivialAugmentWide}[auto_augment]
        self.auto_augment = self.auto_augment() if self.auto_augment else None

    def options(self, image: torch.Tensor) -> torch.Tensor:
        """The optional training augmentations, in order: AutoAugment / TrivialAugmentWide, RandAugment,
        colour jitter, grayscale, sharpness, noise."""
        if self.auto_augment is not None:
            image = self.auto_augment(image)
        if self.randaugment is not None:
            image = self.randaugment(image)
        if self.color_jitter:
            for adjust in (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation):
                image = adjust(image, 1 + random.uniform(-self.color_jitter, self.color_jitter))
        if self.grayscale and random.random() < self.grayscale:
            image = TF.rgb_to_grayscale(image, num_output_channels=3)
        if self.sharpness and random.random() < 0.5:
            image = TF.adjust_sharpness(image, 1 + self.sharpness)
        if self.noise:
            noise = torch.randn(image.shape) * (self.noise * 255)
            image = (image.float() + noise).clamp_(0, 255).to(torch.uint8)
        return image

    def prepare(self, image: torch.Tensor, region=None) -> torch.Tensor:
        if region is not None:
            image = crop_region(image, *region)
        elif self.crop_fraction:
            image = TF.crop(image, *center_crop_box(*image.shape[-2:], self.crop_fraction))
        return TF.resize(image, self.resize, antialias=True)

    def augment(self, image: torch.Tensor) -> torch.Tensor:
        return self.options(image)

    def from_prepared(self, image: torch.Tensor) -> torch.Tensor:
        return self.augment(image) if self.train else image

    def __call__(self, image: torch.Tensor, region=None) -> torch.Tensor:
        return self.from_prepared(self.prepare(image, region))


class CustomAugmentation(BaseAugmentation):
    """Centre crop (320x256 on a 512x384 image: the same fraction of any input), resize; in training
    also horizontal flip, then the optional augmentations (see BaseAugmentation)."""
    crop_fraction = CROP_FRACTION

    def augment(self, image: torch.Tensor) -> torch.Tensor:
        if random.random() < 0.5:
            image = image.flip(-1)
        return self.options(image)


class AlbumentationsAugmentation(CustomAugmentation):
    """Centre crop and resize, then in training albumentations' flip, shift-scale-rotate,
    brightness/contrast, hue/saturation and coarse dropout."""

    def __init__(self, resize=(128, 96), train=True, crop_fraction=None, **options):
        import albumentations as A
        super().__init__(resize, train, crop_fraction, **options)
        self.pipeline = A.Compose([
            A.HorizontalFlip(p=0.5),
            A.Affine(translate_percent=0.05, scale=(0.9, 1.1), rotate=(-10, 10), p=0.5),
            A.RandomBrightnessContrast(0.2, 0.2, p=0.5),
            A.HueSaturationValue(10, 15, 10, p=0.3),
            A.CoarseDropout(num_holes_range=(1, 4), hole_height_range=(0.05, 0.15),
                            hole_width_range=(0.05, 0.15), p=0.3),
        ])

    def augment(self, image: torch.Tensor) -> torch.Tensor:
        array = self.pipeline(image=image.permute(1, 2, 0).numpy())["image"]
        return self.options(torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1).contiguous())


AUGMENTATIONS = {cls.__name__: cls for cls in (BaseAugmentation, CustomAugmentation, AlbumentationsAugmentation)}


def preprocess_transform(preprocess):
    """The validation and inference transform a run's spec.Preprocess describes (an image's own region, e.g.
    its face square, comes with the image)."""
    return create_transforms(preprocess.augmentation, preprocess.resize, crop_fraction=preprocess.crop)[1]


def create_transforms(name, resize, **options):
    """(train, val) transforms of augmentation `name`; validation never gets random augmentation."""
    if name not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {name!r}; choose from {', '.join(AUGMENTATIONS)}")
    return AUGMENTATIONS[name](resize, train=True, **options), AUGMENTATIONS[name](resize, train=False, **options)


class DeviceAugment:
    """Batch-wise augmentation with torch ops on whatever device the batch is on (GPU after the
    prefetcher, or CPU): per-image horizontal flip, random resized crop (scale of the area) and
    brightness / contrast. Input and output: float images in [0, 1], (N, 3, H, W)."""

    def __init__(self, flip=0.5, crop_scale=(0.8, 1.0), brightness=0.2, contrast=0.2, generator=None):
        self.flip, self.crop_scale, self.brightness, self.contrast = flip, crop_scale, brightness, contrast
        self.generator = generator

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        n, device = len(images), images.device
        draws = torch.rand(6, n, generator=self.generator)  # every draw of the batch, moved in one copy
        if device.type == "cuda":
            draws = draws.pin_memory()
        flip_draw, scale_draw, x_draw, y_draw, gain_draw, offset_draw = draws.to(device, non_blocking=True)
        if self.flip:
            flipped = flip_draw < self.flip
            images = torch.where(flipped[:, None, None, None], images.flip(-1), images)
        if self.crop_scale and self.crop_scale != (1.0, 1.0):
            scale = (self.crop_scale[0] + (self.crop_scale[1] - self.crop_scale[0]) * scale_draw).sqrt()
            shift_x = (1 - scale) * (2 * x_draw - 1)
            shift_y = (1 - scale) * (2 * y_draw - 1)
            theta = torch.zeros(n, 2, 3, device=device, dtype=images.dtype)
            theta[:, 0, 0], theta[:, 1, 1], theta[:, 0, 2], theta[:, 1, 2] = scale, scale, shift_x, shift_y
            grid = torch.nn.functional.affine_grid(theta, list(images.shape), align_corners=False)
            images = torch.nn.functional.grid_sample(images, grid, mode="bilinear", align_corners=False)
        if self.brightness or self.contrast:
            gain = 1 + self.contrast * (2 * gain_draw - 1)
            offset = self.brightness * (2 * offset_draw - 1)
            mean = images.mean((1, 2, 3), keepdim=True)
            images = ((images - mean) * gain[:, None, None, None] + mean + offset[:, None, None, None]).clamp(0, 1)
        return images


def mix_batch(images: torch.Tensor, mixup_alpha=0.0, cutmix_alpha=0.0):
    """Batch-level MixUp or CutMix (one of the two at random when both are on). Returns (images,
    permutation, lam); the loss is lam * loss(targets) + (1 - lam) * loss(targets[permutation]),
    so that every head of any model kind gets its own mixed target."""
    n, height, width = len(images), images.shape[-2], images.shape[-1]
    permutation = torch.randperm(n, device=images.device)  # no host copy (and sync) per batch
    cutmix = cutmix_alpha > 0 and (mixup_alpha <= 0 or torch.rand(1).item() < 0.5)
    alpha = cutmix_alpha if cutmix else mixup_alpha
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    if not cutmix:
        return images * lam + images[permutation] * (1 - lam), permutation, lam
    cut_h, cut_w = int(height * math.sqrt(1 - lam)), int(width * math.sqrt(1 - lam))
    cy, cx = int(torch.randint(height, (1,))), int(torch.randint(width, (1,)))
    y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
    x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
    images = images.clone()
    images[:, :, y0:y1, x0:x1] = images[permutation, :, y0:y1, x0:x1]
    return images, permutation, 1 - (y1 - y0) * (x1 - x0) / (height * width)
