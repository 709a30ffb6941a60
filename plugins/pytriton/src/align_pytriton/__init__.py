"""align-pytriton: critic and reward-model servers on NVIDIA PyTriton, and their clients.

Being built: registers nothing yet.
"""
