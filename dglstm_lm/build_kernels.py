"""`python -m dglstm_lm.build_kernels`: compile the fused CPU kernel of the DGLSTM ahead of time (make setup)."""

import sys

from .models.kernels import main

if __name__ == "__main__":
    sys.exit(main(["--build"] + sys.argv[1:]))
