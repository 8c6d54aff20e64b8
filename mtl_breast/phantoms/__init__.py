"""Synthetic breast DCE-MRI: a physics model of one case (`physics`) and collections of cases written in the
MAMA-MIA layout with clinical tables and known pCR probabilities (`collection`). Used by the demo, the tests
and the benchmarks; nothing here is read by a model at training or prediction time."""
