"""Serve a build with Triton Inference Server: write the repository, run the served models, call them.

``repository`` writes it (configs from ``config``, checked with Triton's ModelConfig protobuf);
``serving`` and ``routing`` are the Python-backend models it runs; ``client`` calls them;
``server`` starts a local ``tritonserver`` for a repository.
"""
