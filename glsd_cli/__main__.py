"""`python -m glsd_cli ...` (what torchrun launches) is the same as `glsd ...`."""
from glsd_cli.cli import main

main()
