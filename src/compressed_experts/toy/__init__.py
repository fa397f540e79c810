"""Recipes and experiments on the bundled small MoE: its pretraining recipe and corpus, the demo,
the forms study and their downstream tasks. (The model itself ships in ``compressed_experts/bundled_model``
and loads as the source ``"bundled"``: see :mod:`compressed_experts.sources`.)"""
