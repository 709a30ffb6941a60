"""align-lora: LoRA adapters (peft) on any algorithm's models.

Being built: registers nothing yet.
"""
