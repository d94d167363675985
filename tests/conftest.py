import os

import torch

# Without a GPU the Triton kernels run in the interpreter; this must be set before they are defined.
if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("APKERNELS_QUIET", "1")

import apkernels  # noqa: E402,F401
