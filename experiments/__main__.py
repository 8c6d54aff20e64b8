"""Run one experiment of the evidence suite by name and write its JSON (``--out``), or render tables of stored ones.

``python -m experiments NAME ...``; the experiment's module is imported only once it is named, so ``--help``
answers without loading torch.
"""

from __future__ import annotations

import argparse
import importlib
import json
import shlex
import sys
from pathlib import Path

from mtl_breast.files import write_text

# name -> (module, what it does)
EXPERIMENTS = {
    "demo-runs": ("experiments.demo_runs", "one `mtl-breast demo` per seed: the runs the others read"),
    "heldout": ("experiments.heldout", "the runs' models vs the baselines vs kinetics-removed inputs, on the same "
                                       "held-out phantoms"),
    "own-heldout": ("experiments.own_heldout", "each run on its own held-out split, with the washout removed too"),
    "label-efficiency": ("experiments.label_efficiency", "fine-tune n labelled cases from MAE weights and from "
                                                         "scratch"),
    "ablations": ("experiments.ablations", "one change at a time against the joint model (configs/experiments/)"),
    "report": ("experiments.report", "markdown tables of stored result files"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    listing = "\n".join(f"  {name:<17} {about}" for name, (_, about) in EXPERIMENTS.items())
    p = argparse.ArgumentParser(prog="python -m experiments", description=__doc__.splitlines()[0],
                                epilog=f"experiments:\n{listing}\n\n`python -m experiments NAME --help` shows one "
                                       "experiment's flags.", formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", choices=EXPERIMENTS, metavar="NAME", help="the experiment to run (listed below)")
    p.add_argument("args", nargs=argparse.REMAINDER, help="its flags")
    top = p.parse_args(argv)
    module = importlib.import_module(EXPERIMENTS[top.name][0])
    sub = argparse.ArgumentParser(prog=f"python -m experiments {top.name}", description=module.__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    module.add_arguments(sub)
    args = sub.parse_args(top.args)
    result = module.run(args)
    if result is None:  # the experiment printed what it had to say (report, ablations --list)
        return 0
    result["command"] = shlex.join(["python", "-m", "experiments", *argv])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_text(args.out, json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("table", "results", "raw", "per_run")},
                     indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
