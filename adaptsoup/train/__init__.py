"""The resumable training loop, and LP-FT's linear probe.
"""
