"""align-spr: SPR — successive policy re-weighting (sample, score, weighted SFT; one model in memory).

Being built: registers nothing yet.
"""
