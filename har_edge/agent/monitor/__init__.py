"""On-device monitoring of a model's inputs and outputs against its training reference.

Three layers per file (:mod:`.accumulate` gathers, :mod:`.verdict` judges):
confidence (temperature-calibrated), temporal (label flips, dwell times) and
drift (PSI per channel and per window feature, input saturation). The reference
they compare against lives in the manifest (:mod:`.reference`). Pure numpy,
bounded memory: a file's monitor state is a few histograms and sums.
"""
