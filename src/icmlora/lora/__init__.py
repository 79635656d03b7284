"""LoRA adapters: the train_lora stage and adapter I/O (PEFT folders <-> tensors)."""
