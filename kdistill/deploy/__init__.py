"""Deployment: export a model dir (HF / ONNX / int8, with a parity check), predict with it, serve it over HTTP."""
