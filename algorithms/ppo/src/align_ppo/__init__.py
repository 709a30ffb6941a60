"""align-ppo: PPO (GAE, clipped policy and value losses, KL control) with a local or remote (PyTriton) critic.

Being built: registers nothing yet.
"""
