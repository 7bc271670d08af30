"""The `pathmonitor` command: `pathmonitor fit --config configs/digits.yaml` trains with LightningCLI
(configs stack: `--config a.yaml --config b.yaml`); `pathmonitor demo` trains the demo config next to its
dense twin (the same run without the regularizer and the pruning), compares them and draws the run's
report; `pathmonitor norm | drift | scores | bound | quantize | report` audit checkpoints and runs
(callbacks/audit.py); `pathmonitor certify-demo` prints path-norms of torchvision models and certifies a
pruning and quantizations of ResNet-18."""
from __future__ import annotations

import sys
from typing import Optional, Sequence

from .audit import COMMANDS
from .audit import main as audit_main


LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")
OWN_COMMANDS = ("demo", "certify-demo")

OVERVIEW = """pathmonitor trains with path quantities in view, and audits what training left.

training, through LightningCLI (`pathmonitor fit --help` lists its options):
  pathmonitor fit --config configs/digits.yaml   also validate, test, predict; configs stack
  pathmonitor demo [-c|--config CONFIG ...]      the demo config next to its dense twin, compared
  pathmonitor certify-demo                       path-norms of torchvision models, a certified pruning
                                                 and quantizations of ResNet-18

auditing checkpoints and runs (`pathmonitor norm --help` and so on):"""


def main(args: Optional[Sequence[str]] = None) -> None:
    argv = list(sys.argv[1:] if args is None else args)
    if argv in ([], ["-h"], ["--help"]):
        print(OVERVIEW)
        sys.exit(audit_main(["--help"]))
    if not argv[0].startswith("-") and argv[0] not in (*LIGHTNING_COMMANDS, *OWN_COMMANDS, *COMMANDS):
        unknown_command(argv[0])
    if argv[:1] == ["certify-demo"]:
        from pathmonitor.demo import main as certify_demo

        certify_demo(argv[1:])
        return
    if argv[:1] and argv[0] in COMMANDS:  # the audit needs no Lightning: its answers come without that import
        sys.exit(audit_main(argv))
    from .train import demo, lightning_cli

    if argv[:1] == ["demo"]:
        demo(argv[1:])
        return
    lightning_cli(argv)


def unknown_command(name: str) -> None:
    """End as a usage mistake does: one line naming every command, exit code 2."""
    commands = ", ".join((*LIGHTNING_COMMANDS, *OWN_COMMANDS, *COMMANDS))
    print(f"pathmonitor: unknown command {name!r}; the commands are {commands} (see --help)", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    main()
