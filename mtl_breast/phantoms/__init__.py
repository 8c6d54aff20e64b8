"""Synthetic breast DCE-MRI: tracer kinetics and the signal equation (`tracer`), the randomised physics and the
pCR law of the phantom population (`population`), the rendering of one case (`physics`) and collections of cases
written in the MAMA-MIA layout, with each case's hidden values in separate truth files (`collection`). Used by
the demo, the tests and the benchmarks; nothing here is read by a model at training or prediction time."""
