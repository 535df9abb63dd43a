"""`python -m odis ...` is the `odis` command; `torchrun --nproc_per_node N -m odis train ...` starts training."""
from odis.cli import main

main()
