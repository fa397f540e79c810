"""Serving compressed-experts checkpoints with vLLM (``pip install -e ".[serve]"``; docs/serving.md).

- :mod:`.vllm_plugin`: the ``vllm.general_plugins`` entry point that registers the architectures;
- :mod:`.vllm_models`: vLLM's model of each family with compressed-experts MoE blocks;
- :mod:`.sharding`: how a block is split over tensor-parallel ranks (pure PyTorch).

Nothing here imports vLLM until it is used, so the package imports without it.
"""
