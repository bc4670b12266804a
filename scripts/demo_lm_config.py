"""The demo LM's shape (moshi LMModel keywords), shared by the asset build and the research scripts."""

# moshi's LMModel, small; attention context 50 tokens = 4 s (12.5 tokens/s).
LM_CONFIG = {
    "delays": [0, 0, 1, 1, 1, 1, 1, 1, 1], "n_q": 8, "dep_q": 8, "card": 256, "text_card": 8,
    "existing_text_padding_id": 3, "dim": 128, "num_heads": 4, "num_layers": 4, "hidden_scale": 4.0,
    "causal": True, "context": 50, "max_period": 10000, "gating": "silu", "norm": "rms_norm_f32",
    "positional_embedding": "rope", "depformer_dim": 64, "depformer_dim_feedforward": 128,
    "depformer_num_heads": 2, "depformer_num_layers": 1, "depformer_context": 8, "depformer_max_period": 10000,
    "depformer_gating": "silu", "depformer_pos_emb": "none", "depformer_weights_per_step": True,
    "depformer_multi_linear": True,
}  # fmt: skip
