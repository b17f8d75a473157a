"""Native TensorRT: build strongly typed engines from a model dir's graphs and run them.

Importing this package imports neither tensorrt nor torch: `build` and `backend` load them when
they are called, so the pure planning code (profiles, buffer plans, compatibility checks) runs and
is tested on machines without a GPU. `requirements` says what is missing and how to install it.
"""
