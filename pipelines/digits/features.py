"""Feature names of the digits data, shared by the pipeline definition and its module file
(kept free of TensorFlow imports so defining the pipeline stays light)."""

PIXEL_KEYS = [f"pixel_{i:02d}" for i in range(64)]
LABEL_KEY = "label"
IMAGE_XF = "image_xf"
LABEL_XF = "label_xf"
IMAGE_SHAPE = (8, 8, 1)
NUM_CLASSES = 10
