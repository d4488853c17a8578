"""`python -m mrgen_dist.train`: the launch line of earlier releases (`accelerate launch -m mrgen_dist.train`,
`torchrun -m mrgen_dist.train`), kept for one release. The command is `mrgen_dist.commands.train`."""

import sys

from mrgen_dist.commands.train import main

if __name__ == "__main__":
    sys.exit(main())
