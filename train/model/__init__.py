"""The model: building it (``build``: full, LoRA, QLoRA), placing it on devices and processes
(``placement``), the GPU fast path (``fast_path``), 4-bit loading shard by shard (``quantized_loading``),
saving without gathering it whole (``sharded_save``) and GGUF writing (``gguf``)."""
