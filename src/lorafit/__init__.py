"""lorafit: Hydra-driven LoRA fine-tuning on Lightning."""

import os

__version__ = "0.1.0"

# oneDNN (torch's CPU matmul library) compiles and caches one kernel per matmul shape, 1,024 by
# default; the varying sequence lengths of a fine-tuning run fill that cache and the process's
# memory grows with it (the default run's peak: 2,795 MB with 1,024, 2,404 MB with 64). 32
# kernels keep the speed (a step's shapes repeat within it) at less memory. oneDNN reads it when
# it first runs, so it acts when lorafit is imported before any matmul (`lorafit train`); set the
# variable yourself to choose another size (benchmarks/RESULTS.md).
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "32")
