"""Jobs: each reads a folder and writes a folder (predict, evaluate, extract, report, plot, train through
LightningCLI, fit-check, demo, the challenge adapter). The only layer that walks folders of files; `cli.py` parses
the command line and calls one function here."""
