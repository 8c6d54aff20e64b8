"""The evidence suite: does the joint model learn pCR from contrast kinetics, and does MAE pretraining help?

Every experiment runs on CPU on synthetic phantoms, on its own, from a source checkout, and writes JSON; `report`
renders the tables of docs/RESULTS.md from those files. One module per experiment (`demo_runs`, `heldout`,
`own_heldout`, `label_efficiency`, `ablations`), what they share in `common`, the ablations and the comparisons in
`variants`, the tables in `report`; `python -m experiments NAME --help` shows an experiment's flags and
experiments/suite.sh runs them all in order.
"""
