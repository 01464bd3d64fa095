"""Honest latency: every figure measured on one device, and it says which.

* :mod:`~skipviz.measure.clock` - devices, synchronisation, environment, interleaved timing.
* :mod:`~skipviz.measure.runs` - the masked baseline, full vs skipped vs masked of a policy, throughput, one
  input's latency.
* :mod:`~skipviz.measure.profile` - per-block latency profiles; :mod:`~skipviz.measure.predict` - latency
  predicted from a profile.

The latency benchmark that drives them is the command's (:mod:`skipviz.cli.bench`).
"""
