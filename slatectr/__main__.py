"""`python -m slatectr ...` is `ctr ...`: what torchrun starts in every worker of
`ctr train --nproc N` (see `slatectr.launch`)."""

from slatectr.cli import main

main()
