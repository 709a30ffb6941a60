"""align-steerlm: SteerLM — attribute prediction, attribute-conditioned SFT and steering at generation time.

Being built: registers nothing yet.
"""
