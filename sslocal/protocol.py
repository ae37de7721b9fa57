"""The evaluation protocol's constants (docs/protocol.md), in one place; imports nothing.

Every module that needs a frame size, the audio clip's length, the spectrogram's shape or the
image normalisation reads it here, so that a variant is a named option somewhere else and never
a second copy of a number.
"""

# Maps and ground truth: boxes are stored, and cIoU is scored, on a MAP_SIZE x MAP_SIZE grid.
MAP_SIZE = 224
IMAGE_SIZE = 224  # the paper's frame size S (a config may train at another)
TRAIN_SCALE = 1.1  # training frames keep int(1.1 * S) on the shorter side for the random crop

# Audio (section 1): 3 s of mono 16 kHz audio centred on the clip.
SAMPLE_RATE = 16000
CLIP_SECONDS = 3.0
CLIP_SAMPLES = 48000  # SAMPLE_RATE * CLIP_SECONDS
MIN_AUDIO_SECONDS = 0.1  # shorter audio is an error, never tiled

# The log spectrogram: scipy.signal.spectrogram(x, fs=16000, nperseg=512, noverlap=274).
SPEC_NPERSEG = 512
SPEC_NOVERLAP = 274
SPEC_LOG_EPS = 1e-7
SPEC_SHAPE = (257, 200)  # (frequencies, frames)
SPEC_SCALE = 12.0  # the model input is log S / SPEC_SCALE

# Frames: ImageNet statistics of (x / 255) per RGB channel.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
