"""align-megatron: a megatron-core backend (tensor, pipeline, data parallel) and HF<->Megatron conversion.

Being built: registers nothing yet.
"""
