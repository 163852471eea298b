"""edgelab: the package behind the notebooks (one module per chapter; see README, "The package")."""
import logging

# torch.utils.cpp_extension warns "No CUDA runtime is found" when a library imports it on a CPU-only
# machine (here: through the INT8 and deployment stacks, also in worker processes). It says nothing
# about the CPU work of this workbook, so it is kept out of the students' outputs.
logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
