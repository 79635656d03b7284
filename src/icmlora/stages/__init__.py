"""The pipeline's stages: one module per dvc.yaml stage, named exactly as the stage.

Each module has a plain function that does the work (parameters and paths in, what it wrote
out) and a thin ``main(argv)``; ``python -m icmlora.stages.<stage>`` runs it. A stage imports
shared modules only, never another stage (tests/test_architecture.py).

Importing this package pins the CPU's numeric code paths (``icmlora.kernels``) before any stage
module imports torch.
"""

from icmlora.kernels import pin

pin()
