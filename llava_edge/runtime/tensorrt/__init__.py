"""Native TensorRT: build strongly typed engines from a model dir's graphs and run them.

Importing this package imports neither tensorrt nor cuda-python, and nothing in it ever imports
torch: `build` and `backend` load what they need when they are called, so the pure planning code
(profiles, buffer plans, compatibility checks) runs and is tested on machines without a GPU.
`requirements` and `cuda` say what is missing and how to install it.
"""
