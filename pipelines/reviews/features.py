"""Feature names and sizes of the reviews data, shared by the pipeline definition and its module
file (kept free of TensorFlow imports so defining the pipeline stays light)."""

TEXT_KEY = "text"
LABEL_KEY = "label"
TOKENS_XF = "tokens_xf"  # int64 [MAX_LEN]: vocabulary ids + 1 (0 = padding)
MASK_XF = "padding_mask_xf"  # int64 [MAX_LEN]: 1 for a token, 0 for padding
LABEL_XF = "label_xf"
VOCAB_SIZE = 2000  # most frequent tokens kept; the rest share one OOV bucket
MAX_LEN = 64  # tokens per review after truncation / padding
NUM_CLASSES = 2
