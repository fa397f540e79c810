"""The bundled small MoE, its pretraining recipe, and the demo's downstream tasks."""
