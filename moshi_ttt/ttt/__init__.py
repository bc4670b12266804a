"""TTT math (ops), the streaming TTT block (layer) and its placement into moshi (apply)."""
