"""The SSCD preprocessing presets, without torch: common.similarity applies them, and the mitigation CLIs offer
their names as choices before torch is imported."""

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

SSCD_PRESETS = {
    "wen": dict(resize=256, crop=224, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
    "sscd": dict(resize=288, crop=None, mean=IMAGENET_MEAN, std=IMAGENET_STD),
    # an (h, w) pair resizes to exactly that size rather than the short side
    "zhang": dict(resize=(320, 320), crop=None, mean=IMAGENET_MEAN, std=IMAGENET_STD),
}
