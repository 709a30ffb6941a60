"""align-spin: SPIN — self-play fine-tuning with any paired preference loss.

Being built: registers nothing yet.
"""
