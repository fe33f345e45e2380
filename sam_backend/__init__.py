"""sam-backend: the Segment Anything Model (keras-hub) behind Label Studio's ML backend protocol.

Importing the package sets the environment that keras and TensorFlow read at
import time, so it must happen before either is imported:

- ``KERAS_BACKEND`` defaults to ``torch`` (an explicit value is kept);
- TensorFlow, where a plain pip install pulls it in (keras-hub's tensorflow-text), is told to be quiet;
- ``SAM_DEVICE`` (``cpu``, ``cuda``, ``cuda:1``...) forces keras' torch device.
"""

import os

os.environ.setdefault("KERAS_BACKEND", "torch")
# TensorFlow is only imported as a dependency of keras-hub; its C++ and oneDNN
# start-up chatter is noise for a server log.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
if os.environ.get("SAM_DEVICE"):
    os.environ.setdefault("KERAS_TORCH_DEVICE", os.environ["SAM_DEVICE"])

__version__ = "0.1.0"
